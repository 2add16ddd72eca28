package caddymodule

import (
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestClosestSuggestsPlausibleTypos(t *testing.T) {
	keys := []string{"new-checkout-flow", "homepage-hero", "recommendations-kill-switch"}
	for in, want := range map[string]string{
		"new-checkout-flw":  "new-checkout-flow", // a letter missing
		"new-chekcout-flow": "new-checkout-flow",
		"new-checkout":      "new-checkout-flow", // cut short
		"homepage-hero-v2":  "homepage-hero",     // run on
		"home":              "",                  // too short to tell
		"pricing-page":      "",
	} {
		if got := closest(in, keys); got != want {
			t.Errorf("closest(%q) = %q, want %q", in, got, want)
		}
	}
	if got := closest("tru", []string{"true", "false"}); got != "true" {
		t.Errorf("closest(tru) = %q", got)
	}
}

// A reference the definitions satisfied is reported, once, when definitions
// that change at runtime stop having its flag.
func TestAReferencedFlagThatDisappearsIsLoggedOnce(t *testing.T) {
	app := newTestApp(t, []byte(overridesTestDefs), 0)
	core, logs := observer.New(zap.WarnLevel)
	app.logger = zap.New(core)
	app.reference(flagReference{flag: "checkout", values: []string{"true"}, where: "lb_policy feature_flag checkout"})
	app.reference(flagReference{flag: "hero", values: []string{"test"}, where: "feature_flag matcher"})
	if n := logs.Len(); n != 0 {
		t.Fatalf("%d warnings for references the definitions satisfy: %v", n, logs.All())
	}
	without := []byte(`{"flags": [{"key": "hero", "active": true, "filters": {"groups": [{}], "multivariate": {"variants": [
		{"key": "control", "rollout_percentage": 100}]}}}]}`)
	for range 3 { // the same definitions again, and again
		res, err := app.engine.install(definitionsSource{kind: sourceFile}, without)
		if err != nil {
			t.Fatal(err)
		}
		app.checkReferences(res.defs)
	}
	var problems []string
	for _, e := range logs.All() {
		problems = append(problems, e.ContextMap()["problem"].(string))
	}
	want := []string{
		`lb_policy feature_flag checkout: the definitions have no flag "checkout"`,
		`feature_flag matcher: flag "hero" never has the value "test" (it is true, false, control)`,
	}
	if len(problems) != len(want) || problems[0] != want[0] || problems[1] != want[1] {
		t.Errorf("warnings:\n%q\nwant:\n%q", problems, want)
	}
}

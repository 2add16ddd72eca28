package eval

import (
	"strconv"
	"strings"
	"testing"
)

func pct(p float64) *float64 { return &p }

func TestKillSwitchOverride(t *testing.T) {
	d := mustParse(t, `{"flags": [{"key": "k", "active": true, "filters": {"groups": [{}], "payloads": {"true": "1", "false": "0"}}}]}`)
	killed := d.WithOverrides(map[string]Override{"k": {Killed: true}})
	for i := 0; i < 100; i++ {
		s := &Subject{DistinctID: "user-" + strconv.Itoa(i)}
		if r := killed.Evaluate("k", s); r.Enabled || r.Reason != ReasonKilled || r.Payload == nil || string(r.Payload.Raw) != `"0"` {
			t.Fatalf("killed flag: %s %s payload %v", r.Value(), r.Reason, r.Payload)
		}
		if r := d.Evaluate("k", s); !r.Enabled {
			t.Fatal("WithOverrides changed the original definitions")
		}
	}
	if f, _ := killed.Flag("k"); f.Override() == nil || !f.Override().Killed {
		t.Error("Override() does not report the kill switch")
	}
}

func TestRolloutOverrideIsMonotonicAndUsesTheRolloutHash(t *testing.T) {
	d := mustParse(t, `{"flags": [{"key": "ramp", "active": true, "filters": {"groups": [
		{"properties": [{"key": "plan", "value": "free"}], "rollout_percentage": 10},
		{"rollout_percentage": 100}
	]}}]}`)
	at := func(p float64) *Definitions {
		return d.WithOverrides(map[string]Override{"ramp": {RolloutPercentage: pct(p)}})
	}
	d5, d25 := at(5), at(25)
	in5, in25 := 0, 0
	for i := 0; i < 20000; i++ {
		id := "user-" + strconv.Itoa(i)
		s := &Subject{DistinctID: id, Person: Properties{{Key: "plan", Value: String("pro")}}}
		h := Hash("ramp", id, "")
		r5, r25 := d5.Evaluate("ramp", s), d25.Evaluate("ramp", s)
		if r5.Enabled != (h <= 0.05) || r25.Enabled != (h <= 0.25) {
			t.Fatalf("%s (hash %v): in at 5%%=%v, at 25%%=%v", id, h, r5.Enabled, r25.Enabled)
		}
		if r5.Enabled && !r25.Enabled {
			t.Fatalf("%s in at 5%% but out at 25%%", id)
		}
		if r5.Enabled {
			in5++
		}
		if r25.Enabled {
			in25++
		}
		// A condition's own smaller percentage still applies: min(10, 25).
		free := &Subject{DistinctID: id, Person: Properties{{Key: "plan", Value: String("free")}}}
		if got := d25.Evaluate("ramp", free); got.Enabled != (h <= 0.10 || h <= 0.25) {
			t.Fatalf("%s free plan: %v", id, got.Enabled)
		}
	}
	if in5 < 800 || in5 > 1200 || in25 < 4600 || in25 > 5400 {
		t.Errorf("populations off: %d in at 5%%, %d in at 25%% of 20000", in5, in25)
	}
}

func TestVariantOverride(t *testing.T) {
	d := mustParse(t, `{"flags": [
		{"key": "mv", "active": true, "filters": {"groups": [{"rollout_percentage": 0}], "multivariate": {"variants": [{"key": "control", "rollout_percentage": 50}, {"key": "test", "rollout_percentage": 50}]}}},
		{"key": "b", "active": true, "filters": {"groups": [{}]}}
	]}`)
	o := d.WithOverrides(map[string]Override{"mv": {Variant: "test"}, "b": {Variant: "false"}})
	for i := 0; i < 50; i++ {
		s := &Subject{DistinctID: strconv.Itoa(i)}
		if r := o.Evaluate("mv", s); r.Variant != "test" || r.Reason != ReasonOverride {
			t.Fatalf("forced variant: %s %s", r.Value(), r.Reason)
		}
		if r := o.Evaluate("b", s); r.Enabled || r.Reason != ReasonOverride {
			t.Fatalf("forced false: %s %s", r.Value(), r.Reason)
		}
	}
}

func TestOverrideValidation(t *testing.T) {
	d := mustParse(t, `{"flags": [
		{"key": "mv", "active": true, "filters": {"groups": [{}], "multivariate": {"variants": [{"key": "control", "rollout_percentage": 100}]}}},
		{"key": "b", "active": true, "filters": {"groups": [{}]}}
	]}`)
	mv, _ := d.Flag("mv")
	b, _ := d.Flag("b")
	cases := []struct {
		o    Override
		f    *Flag
		want string
	}{
		{Override{}, b, "sets nothing"},
		{Override{RolloutPercentage: pct(101)}, b, "outside 0..100"},
		{Override{RolloutPercentage: pct(-1)}, b, "outside 0..100"},
		{Override{Variant: "nope"}, mv, `no variant "nope"`},
		{Override{Variant: "control"}, b, "is boolean"},
	}
	for _, c := range cases {
		err := c.o.Validate(c.f)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Validate(%+v) = %v, want an error with %q", c.o, err, c.want)
		}
	}
	for _, ok := range []Override{{Killed: true}, {RolloutPercentage: pct(0)}, {RolloutPercentage: pct(100)}, {Variant: "control"}} {
		if err := ok.Validate(mv); err != nil {
			t.Errorf("Validate(%+v): %v", ok, err)
		}
	}
}

func TestDependenciesSeeOverriddenFlags(t *testing.T) {
	d := mustParse(t, `{"flags": [
		{"key": "base", "active": true, "filters": {"groups": [{}]}},
		{"key": "dependent", "active": true, "filters": {"groups": [{"properties": [{"key": "base", "type": "flag", "operator": "flag_evaluates_to", "value": true, "dependency_chain": ["base"]}]}]}}
	]}`)
	s := &Subject{DistinctID: "u"}
	if !d.Evaluate("dependent", s).Enabled {
		t.Fatal("dependency on an enabled flag")
	}
	if d.WithOverrides(map[string]Override{"base": {Killed: true}}).Evaluate("dependent", s).Enabled {
		t.Error("a flag depending on a killed flag still matched")
	}
}

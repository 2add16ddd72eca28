package caddymodule

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/posthog/posthogtest"
)

func TestValidateListsFlagsAndWhatIsNotLocal(t *testing.T) {
	var out bytes.Buffer
	if err := validateDefinitions(&out, filepath.Join("testdata", "definitions", "mixed.json")); err != nil {
		t.Fatalf("valid file: %v\n%s", err, out.String())
	}
	report := out.String()
	for _, want := range []string{
		"5 flags", "rollout", "multivariate: control, test", "company-beta", "inactive", "(group: company)",
		`(flag "continuity"): experience continuity`, `(flag "static-cohort"): cohort 77 is not in the definitions`,
		"Never evaluated locally", "continuity: experience continuity needs PostHog's server",
		"static-cohort: its first condition uses a static cohort (77)",
	} {
		if !strings.Contains(report, want) {
			t.Errorf("report lacks %q:\n%s", want, report)
		}
	}

	out.Reset()
	err := validateDefinitions(&out, filepath.Join("testdata", "definitions", "broken.json"))
	if !errors.Is(err, errInvalidDefinitions) {
		t.Fatalf("malformed file: err = %v", err)
	}
	if !strings.Contains(out.String(), `error: $.flags[1].filters.groups[0].rollout_percentage (flag "bad")`) {
		t.Errorf("report lacks the JSON path:\n%s", out.String())
	}
}

func TestEvalPrintsJSON(t *testing.T) {
	var out bytes.Buffer
	err := runEval(&out, evalOptions{
		definitions: filepath.Join("testdata", "definitions", "mixed.json"),
		distinctID:  "user-42",
		flags:       []string{"rollout", "hero", "static-cohort", "nope"},
		personProps: `{"plan": "pro"}`,
	})
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		DistinctID string `json:"distinct_id"`
		Results    []struct {
			Key          string          `json:"key"`
			Value        any             `json:"value"`
			Payload      json.RawMessage `json:"payload"`
			Reason       string          `json:"reason"`
			Inconclusive bool            `json:"inconclusive"`
		} `json:"results"`
	}
	if err := json.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	subj := &eval.Subject{DistinctID: "user-42", Person: eval.Properties{{Key: "plan", Value: eval.String("pro")}}}
	defs := mustParseFile(t, filepath.Join("testdata", "definitions", "mixed.json"))
	if got.DistinctID != "user-42" || len(got.Results) != 4 {
		t.Fatalf("output %s", out.String())
	}
	for _, r := range got.Results {
		want := defs.Evaluate(r.Key, subj)
		if r.Value != want.JSONValue() || r.Reason != want.Reason.String() || r.Inconclusive != want.Inconclusive() {
			t.Errorf("%s: printed %v/%s, evaluator says %v/%s", r.Key, r.Value, r.Reason, want.JSONValue(), want.Reason)
		}
	}
	if got.Results[3].Reason != "unknown_flag" || got.Results[2].Reason != "static_cohort" {
		t.Errorf("reasons: %+v", got.Results)
	}
	for _, bad := range []evalOptions{
		{definitions: "testdata/definitions/mixed.json"},
		{definitions: "testdata/definitions/mixed.json", distinctID: "u", personProps: "{"},
		{definitions: "testdata/definitions/mixed.json", distinctID: "u", now: "yesterday"},
		{definitions: "testdata/definitions/missing.json", distinctID: "u"},
	} {
		if err := runEval(&bytes.Buffer{}, bad); err == nil {
			t.Errorf("runEval(%+v) succeeded", bad)
		}
	}
}

func mustParseFile(t *testing.T, path string) *eval.Definitions {
	t.Helper()
	var out bytes.Buffer
	if err := validateDefinitions(&out, path); err != nil {
		t.Fatal(err)
	}
	defs, err := readDefinitions(path)
	if err != nil {
		t.Fatal(err)
	}
	return defs
}

// validate names the flags whose regexes need the backtracking engine.
func TestValidateNamesTheSlowerRegexEngine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, path, []byte(`{"flags": [
		{"key": "vip", "active": true, "filters": {"groups": [{"properties": [
			{"key": "email", "operator": "regex", "value": "(?<=@)example\\.com$"}]}]}},
		{"key": "plain", "active": true, "filters": {"groups": [{"properties": [
			{"key": "email", "operator": "regex", "value": "@example\\.com$"}]}]}}]}`))
	var out bytes.Buffer
	if err := validateDefinitions(&out, path); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	report := out.String()
	i := strings.Index(report, "Regexes on the slower, backtracking engine")
	if i < 0 || !strings.Contains(report[i:], `vip: "(?<=@)example\\.com$"`) || strings.Contains(report[i:], "plain:") {
		t.Errorf("report:\n%s", report)
	}
}

func TestValidateConfigChecksTheExampleClean(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "Caddyfile.example"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt(data, nil)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := checkConfig(cfg, "..", nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.errors) != 0 || len(rep.warnings) != 0 || len(rep.refs) != 3 || rep.defs.Len() != 3 {
		t.Errorf("the example: %d references, errors %q, warnings %q", len(rep.refs), rep.errors, rep.warnings)
	}
}

// A config with a typo'd flag, value and upstream fails with the suggestion;
// flags in expressions and in flags lines are checked too.
func TestValidateConfigReportsTyposWithSuggestions(t *testing.T) {
	dir := t.TempDir()
	defs, err := filepath.Abs(filepath.Join("..", "flags.example.json"))
	if err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(dir, "Caddyfile")
	writeFileAtomically(t, config, []byte(fmt.Sprintf(`{
	feature_flags {
		definitions %s
	}
}
:8080 {
	feature_flags {
		flags new-checkout-flw homepage-hero
	}
	@hero feature_flag homepage-hero varaint-b
	@cel expression feature_flag('recomendations-kill-switch', 'false')
	header @hero X-Hero b
	header @cel X-Off yes
	reverse_proxy localhost:9001 localhost:9002 {
		lb_policy feature_flag new-checkout-flow {
			tru localhost:9002
			default localhost:30001
		}
	}
}`, defs)))
	var out bytes.Buffer
	err = validateConfig(&out, config, "", nil)
	if !errors.Is(err, errConfigMismatch) {
		t.Fatalf("validate --config on typos: %v\n%s", err, out.String())
	}
	for _, want := range []string{
		`feature_flags flags (server srv0): the definitions have no flag "new-checkout-flw" (did you mean new-checkout-flow?)`,
		`feature_flag matcher (server srv0): flag "homepage-hero" never has the value "varaint-b"`, "did you mean variant-b?",
		`feature_flag expression (server srv0): the definitions have no flag "recomendations-kill-switch" (did you mean recommendations-kill-switch?)`,
		`flag "new-checkout-flow" never has the value "tru" (it is true, false); did you mean true?`,
		`default upstream localhost:30001 is not one of this reverse_proxy's upstreams (its upstreams are localhost:9001, localhost:9002)`,
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("the report lacks %q:\n%s", want, out.String())
		}
	}
}

// A config whose definitions come from PostHog is checked against PostHog's
// answer.
func TestValidateConfigAsksPostHog(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, checkoutDefs(50))
	t.Cleanup(ph.Close)
	config := filepath.Join(t.TempDir(), "Caddyfile")
	t.Setenv("FLAGSPLIT_TEST_PERSONAL_KEY", testPersonalKey)
	writeFileAtomically(t, config, []byte(fmt.Sprintf(`{
	feature_flags {
		posthog {
			host %s
			project_api_key %s
			personal_api_key {env.FLAGSPLIT_TEST_PERSONAL_KEY}
		}
	}
}
:8080 {
	@hero feature_flag hero test
	@typo feature_flag chekout
	header @hero X-Hero test
	header @typo X-Typo yes
	respond "ok"
}`, ph.URL, testProjectKey)))
	var out bytes.Buffer
	err := validateConfig(&out, config, "", fetchFromPostHog)
	if !errors.Is(err, errConfigMismatch) || !strings.Contains(out.String(), "PostHog at "+ph.URL+": 3 flags") ||
		!strings.Contains(out.String(), `the definitions have no flag "chekout" (did you mean checkout?)`) ||
		strings.Contains(out.String(), `"hero"`) {
		t.Errorf("validate --config against PostHog: %v\n%s", err, out.String())
	}
	if got := ph.Requests(); len(got) != 1 || got[0].Authorization != "Bearer "+testPersonalKey {
		t.Errorf("requests to PostHog: %+v", got)
	}
}

// validate marks flags on a dependency cycle, and the flags depending on
// them, as never evaluated locally, with the cycle's path; eval answers
// dependency_cycle for them.
func TestValidateReportsDependencyCycles(t *testing.T) {
	dep := func(key, on string) string {
		return fmt.Sprintf(`{"key": %q, "active": true, "filters": {"groups": [{"properties": [
			{"key": %q, "type": "flag", "operator": "flag_evaluates_to", "value": true, "dependency_chain": [%q]}], "rollout_percentage": 100}]}}`, key, on, on)
	}
	path := filepath.Join(t.TempDir(), "cycle.json")
	doc := `{"flags": [` + strings.Join([]string{dep("a", "b"), dep("b", "a"), dep("uses-a", "a"), dep("uses-missing", "gone"),
		`{"key": "plain", "active": true, "filters": {"groups": [{"rollout_percentage": 100}]}}`}, ",") + `]}`
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := validateDefinitions(&out, path); err != nil {
		t.Fatalf("validate: %v\n%s", err, out.String())
	}
	report := out.String()
	rows := map[string]string{}
	for _, line := range strings.Split(report, "\n") {
		if f := strings.Fields(line); len(f) >= 5 && f[1] == "active" {
			rows[f[0]] = f[len(f)-1]
		}
	}
	for key, want := range map[string]string{"a": "never", "b": "never", "uses-a": "never", "uses-missing": "never", "plain": "yes"} {
		if rows[key] != want {
			t.Errorf("LOCAL of %s is %q, want %q:\n%s", key, rows[key], want, report)
		}
	}
	for _, want := range []string{
		"  a: every condition starts with a filter that is part of a circular flag dependency: a -> b -> a",
		"  b: every condition starts with a filter that is part of a circular flag dependency: b -> a -> b",
		`  uses-a: every condition starts with a filter that depends on flag "a", which can never be evaluated locally`,
		`  uses-missing: every condition starts with a filter that depends on flag "gone", which is not defined`,
		`warning: $.flags[0].filters.groups[0].properties[0] (flag "a"): flag dependency cycle a -> b -> a`,
	} {
		if !strings.Contains(report, want) {
			t.Errorf("report lacks %q:\n%s", want, report)
		}
	}

	for _, key := range []string{"a", "uses-a"} {
		out.Reset()
		if err := runEval(&out, evalOptions{definitions: path, distinctID: "u", flags: []string{key}}); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out.String(), `"reason": "dependency_cycle"`) {
			t.Errorf("eval %s:\n%s", key, out.String())
		}
	}
}

// validate refuses a document without a list of flags, and one over a
// limit, naming what is wrong.
func TestValidateRefusesDocumentsWithoutFlags(t *testing.T) {
	dir := t.TempDir()
	for doc, want := range map[string]string{
		`{"flags": null}`: `"flags" is null, not a list`,
		`{"flags": {}}`:   `"flags" is an object, not a list`,
		`{}`:              `no "flags"`,
		`{"flags": [], "x": ` + strings.Repeat("[", eval.MaxDepth) + strings.Repeat("]", eval.MaxDepth) + `}`: fmt.Sprintf("deeper than the limit of %d levels", eval.MaxDepth),
	} {
		path := filepath.Join(dir, "flags.json")
		if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		if err := validateDefinitions(&out, path); !errors.Is(err, errInvalidDefinitions) || !strings.Contains(out.String(), want) {
			t.Errorf("%.40s: err %v, report %q, want it to say %q", doc, err, out.String(), want)
		}
	}
}

package caddymodule

import (
	"bytes"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/flagsplit/flagsplit/eval"
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

package eval

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func mustParse(t testing.TB, doc string) *Definitions {
	t.Helper()
	d, err := Parse([]byte(doc))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return d
}

func TestParseRejectsOnlyWhatItCannotRead(t *testing.T) {
	for _, doc := range []string{``, `[]`, `"flags"`, `{"flags": {}}`, `{"flags": [`, `null`} {
		if _, err := Parse([]byte(doc)); err == nil {
			t.Errorf("Parse(%q) succeeded", doc)
		}
	}
	d := mustParse(t, `{"flags": [], "unknown": {"x": 1}}`)
	if d.Len() != 0 || len(d.Problems()) != 0 {
		t.Errorf("empty document: %d flags, problems %v", d.Len(), d.Problems())
	}
}

// An answer without a list of flags lost them on the way (a proxy, a cut
// body, another endpoint): taking it as a project without flags would turn
// every flag off. Only an explicit empty list means that.
func TestParseRefusesADocumentWithoutAListOfFlags(t *testing.T) {
	for doc, want := range map[string]string{
		`{}`:                     `no "flags" list`,
		`{"cohorts": {}}`:        `no "flags" list`,
		`{"flags": null}`:        `"flags" is null, not a list`,
		`{"flags": {}}`:          `"flags" is an object, not a list`,
		`{"flags": {"a": 1}}`:    `"flags" is an object, not a list`,
		`{"flags": "[]"}`:        `"flags" is a string, not a list`,
		`{"flags": 0}`:           `"flags" is a number, not a list`,
		`{"flags": false}`:       `"flags" is a boolean, not a list`,
		`{"flags": [], "x": 1} `: "",
	} {
		d, err := Parse([]byte(doc))
		switch {
		case want == "" && (err != nil || d.Len() != 0):
			t.Errorf("Parse(%s): %v", doc, err)
		case want != "" && (err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), `{"flags": []}`)):
			t.Errorf("Parse(%s): error %v, want one saying %s and naming the empty list", doc, err, want)
		}
	}
}

// Documents over a limit are refused with a *LimitError naming it, before
// anything is decoded.
func TestParseLimits(t *testing.T) {
	nested := func(depth int) string {
		return `{"flags": [], "cohorts": {"1": ` + strings.Repeat(`{"type":"AND","values":[`, depth) + `{}` + strings.Repeat(`]}`, depth) + `}}`
	}
	manyFlags := func(n int) string {
		return `{"flags": [` + strings.TrimSuffix(strings.Repeat(`{"key":"k"},`, n), ",") + `]}`
	}
	big := `{"flags": [], "pad": "` + strings.Repeat("x", MaxDocumentSize) + `"}`
	cases := []struct {
		name, doc string
		limit     string
	}{
		// {"flags": [], "cohorts": {"1": ...}} nests 2 + 2 per group + 1.
		{"nesting at the limit", `{"flags": [], "x": ` + strings.Repeat("[", MaxDepth-1) + strings.Repeat("]", MaxDepth-1) + `}`, ""},
		{"nesting one over the limit", `{"flags": [], "x": ` + strings.Repeat("[", MaxDepth) + strings.Repeat("]", MaxDepth) + `}`, "depth"},
		{"nested property groups under the limit", nested((MaxDepth - 3) / 2), ""},
		{"nesting over the limit", nested(MaxDepth), "depth"},
		{"nesting far over the limit", nested(100_000), "depth"},
		{"brackets inside strings do not nest", `{"flags": [{"key": "` + strings.Repeat(`[{`, 10_000) + `"}]}`, ""},
		{"escaped quotes stay inside strings", `{"flags": [{"key": "\"` + strings.Repeat(`[`, 100) + `"}]}`, ""},
		{"flags at the limit", manyFlags(MaxFlags), ""},
		{"flags over the limit", manyFlags(MaxFlags + 1), "flags"},
		{"size over the limit", big, "size"},
	}
	for _, tc := range cases {
		_, err := Parse([]byte(tc.doc))
		var le *LimitError
		switch {
		case tc.limit == "" && errors.As(err, &le):
			t.Errorf("%s: refused: %v", tc.name, err)
		case tc.limit != "" && (!errors.As(err, &le) || le.Limit != tc.limit):
			t.Errorf("%s: error %v, want the %s limit", tc.name, err, tc.limit)
		case tc.limit != "" && !strings.Contains(err.Error(), "limit of "+strconv.Itoa(le.Max)):
			t.Errorf("%s: %q does not name the limit", tc.name, err)
		}
	}
}

func TestMalformedFlagsAreReportedByPathAndTheRestServes(t *testing.T) {
	d := mustParse(t, `{"flags": [
		{"key": "good", "active": true, "filters": {"groups": [{"rollout_percentage": 100}]}},
		{"key": "bad-rollout", "active": true, "filters": {"groups": [{"rollout_percentage": "fifty"}]}},
		{"key": "bad-props", "active": true, "filters": {"groups": [{"properties": [{"key": "a", "operator": 7}]}]}},
		{"key": "bad-variants", "active": true, "filters": {"multivariate": {"variants": [{"key": "a", "rollout_percentage": "x"}]}, "groups": []}},
		42,
		{"active": true},
		{"key": "good", "active": false},
		{"key": "deleted", "deleted": true, "active": true, "filters": {"groups": [{}]}}
	], "group_type_mapping": {"0": 5}}`)

	wantPaths := map[string]string{
		"$.flags[1].filters.groups[0].rollout_percentage":                "bad-rollout",
		"$.flags[2].filters.groups[0].properties[0].operator":            "bad-props",
		"$.flags[3].filters.multivariate.variants[0].rollout_percentage": "bad-variants",
		"$.flags[4]":             "",
		"$.flags[5].key":         "",
		"$.flags[6].key":         "good",
		"$.group_type_mapping.0": "",
	}
	got := map[string]string{}
	for _, p := range d.Problems() {
		got[p.Path] = p.Flag
	}
	for path, flag := range wantPaths {
		if f, ok := got[path]; !ok || f != flag {
			t.Errorf("no problem reported at %s for flag %q; problems: %v", path, flag, d.Problems())
		}
	}
	if len(d.Problems()) != len(wantPaths) {
		t.Errorf("problems: %v", d.Problems())
	}
	s := &Subject{DistinctID: "u"}
	// PostHog's SDKs index flags by key: the later "good" replaces the first.
	if r := d.Evaluate("good", s); r.Enabled || r.Reason != ReasonDisabled {
		t.Errorf("duplicate key: got %s (%s), want the last definition's false (flag_disabled)", r.Value(), r.Reason)
	}
	if f, _ := d.Flag("good"); f.Index() != 0 || d.Len() != 5 {
		t.Errorf("the replacing definition keeps the first one's place: index %d of %d flags", f.Index(), d.Len())
	}
	for _, key := range []string{"bad-rollout", "bad-props", "bad-variants"} {
		if r := d.Evaluate(key, s); r.Reason != ReasonInvalidDefinition || r.Enabled {
			t.Errorf("%s: got %s %s, want invalid_definition", key, r.Value(), r.Reason)
		}
		f, _ := d.Flag(key)
		if f.Broken() == "" {
			t.Errorf("%s: Broken() is empty", key)
		}
	}
	// Neither SDK reads "deleted" (ruling of 2026-12-02).
	if r := d.Evaluate("deleted", s); !r.Enabled || r.Reason != ReasonConditionMatch {
		t.Errorf("a flag marked deleted is evaluated as usual, got %s (%s)", r.Value(), r.Reason)
	}
}

func TestWarningsNameWhatCannotBeEvaluatedLocally(t *testing.T) {
	d := mustParse(t, `{"flags": [
		{"key": "continuity", "active": true, "ensure_experience_continuity": true, "filters": {"groups": [{}]}},
		{"key": "static", "active": true, "filters": {"groups": [{"properties": [{"key": "id", "type": "cohort", "value": 7}]}]}},
		{"key": "notset", "active": true, "filters": {"groups": [{"properties": [{"key": "a", "operator": "is_not_set"}]}]}},
		{"key": "unknown-op", "active": true, "filters": {"groups": [{"properties": [{"key": "a", "operator": "between", "value": [1, 2]}]}]}},
		{"key": "lookaround", "active": true, "filters": {"groups": [{"properties": [{"key": "a", "operator": "regex", "value": "(?!x)"}]}]}}
	]}`)
	text := ""
	for _, w := range d.Warnings() {
		text += w.String() + "\n"
	}
	for _, want := range []string{
		`"continuity"`, "experience continuity",
		`"static"`, "static cohort",
		`"notset"`, "is_not_set",
		`"unknown-op"`, `"between"`,
		`"lookaround"`, "RE2",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("warnings lack %q:\n%s", want, text)
		}
	}
	if len(d.Problems()) != 0 {
		t.Errorf("well-formed flags reported as problems: %v", d.Problems())
	}
}

func TestCyclesNeverHang(t *testing.T) {
	d := mustParse(t, `{"flags": [
		{"key": "a", "active": true, "filters": {"groups": [{"properties": [{"key": "b", "type": "flag", "operator": "flag_evaluates_to", "value": true, "dependency_chain": ["b"]}]}]}},
		{"key": "b", "active": true, "filters": {"groups": [{"properties": [{"key": "a", "type": "flag", "operator": "flag_evaluates_to", "value": true, "dependency_chain": ["a"]}]}]}},
		{"key": "c", "active": true, "filters": {"groups": [{"properties": [{"key": "id", "type": "cohort", "value": 1}]}]}},
		{"key": "d", "active": true, "filters": {"groups": [{"properties": [{"key": "id", "type": "cohort", "value": 3}]}]}}
	], "cohorts": {
		"1": {"type": "AND", "values": [{"key": "id", "type": "cohort", "value": 2}]},
		"2": {"type": "OR", "values": [{"key": "id", "type": "cohort", "value": 1}]},
		"3": {"type": "OR", "values": [{"type": "AND", "values": [{"key": "id", "type": "cohort", "value": 3}]}]}
	}}`)
	s := &Subject{DistinctID: "u"}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for key, want := range map[string]Reason{"a": ReasonDependencyCycle, "b": ReasonDependencyCycle, "c": ReasonMalformedCohort, "d": ReasonMalformedCohort} {
			if r := d.Evaluate(key, s); r.Reason != want {
				t.Errorf("%s: got %s, want %s", key, r.Reason, want)
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("evaluation of cyclic definitions did not finish")
	}
}

func TestGroupFlagsAndMixedTargeting(t *testing.T) {
	d := mustParse(t, `{"flags": [
		{"key": "g", "active": true, "filters": {"aggregation_group_type_index": 0, "groups": [{"properties": [{"key": "$group_key", "value": "acme"}], "rollout_percentage": 100}]}},
		{"key": "orphan", "active": true, "filters": {"aggregation_group_type_index": 9, "groups": [{}]}},
		{"key": "mixed", "active": true, "filters": {"groups": [
			{"aggregation_group_type_index": 0, "properties": [{"key": "tier", "value": "gold", "type": "group", "group_type_index": 0}]},
			{"properties": [{"key": "plan", "value": "pro"}]}
		]}}
	], "group_type_mapping": {"0": "company"}}`)
	acme := Group{Type: "company", Key: "acme", Properties: Properties{{Key: "tier", Value: String("gold")}}}
	if r := d.Evaluate("g", &Subject{DistinctID: "u", Groups: []Group{acme}}); !r.Enabled {
		t.Errorf("$group_key fallback: %s", r.Reason)
	}
	if r := d.Evaluate("g", &Subject{DistinctID: "u"}); r.Enabled || r.Reason != ReasonNoGroup {
		t.Errorf("no group passed: got %s %s, want false no_group", r.Value(), r.Reason)
	}
	if r := d.Evaluate("orphan", &Subject{DistinctID: "u", Groups: []Group{acme}}); r.Reason != ReasonMissingGroupType {
		t.Errorf("unknown group type index: %s", r.Reason)
	}
	if r := d.Evaluate("mixed", &Subject{DistinctID: "u", Groups: []Group{acme}}); !r.Enabled || r.Condition != 0 {
		t.Errorf("mixed, group condition: %s condition %d", r.Reason, r.Condition)
	}
	// Without the group the group condition is skipped, not inconclusive.
	if r := d.Evaluate("mixed", &Subject{DistinctID: "u", Person: Properties{{Key: "plan", Value: String("pro")}}}); !r.Enabled || r.Condition != 1 {
		t.Errorf("mixed, person condition: %s condition %d", r.Reason, r.Condition)
	}
}

func TestPayloadsAreExposedRawAndAsJSON(t *testing.T) {
	d := mustParse(t, `{"flags": [{"key": "p", "active": true, "filters": {
		"groups": [{"rollout_percentage": 100}],
		"multivariate": {"variants": [{"key": "a", "rollout_percentage": 100}]},
		"payloads": {"a": "{\"color\": \"blue\"}", "true": "plain text"}}}]}`)
	r := d.Evaluate("p", &Subject{DistinctID: "u"})
	if r.Variant != "a" || r.Payload == nil {
		t.Fatalf("got %s payload %v", r.Value(), r.Payload)
	}
	if string(r.Payload.Raw) != `"{\"color\": \"blue\"}"` {
		t.Errorf("raw payload %s", r.Payload.Raw)
	}
	var decoded map[string]string
	if err := json.Unmarshal(r.Payload.JSON, &decoded); err != nil || decoded["color"] != "blue" {
		t.Errorf("JSON payload %s: %v", r.Payload.JSON, err)
	}
	out, err := json.Marshal(r)
	if err != nil || !strings.Contains(string(out), `"payload":{"color":"blue"}`) || !strings.Contains(string(out), `"value":"a"`) {
		t.Errorf("Result JSON: %s %v", out, err)
	}
}

func TestInactiveAndUnknownFlags(t *testing.T) {
	d := mustParse(t, `{"flags": [{"key": "off", "active": false, "filters": {"groups": [{}], "payloads": {"false": "1"}}}]}`)
	r := d.Evaluate("off", &Subject{DistinctID: "u"})
	if r.Enabled || r.Reason != ReasonDisabled || r.Payload == nil {
		t.Errorf("inactive: %s %s payload %v", r.Value(), r.Reason, r.Payload)
	}
	r = d.Evaluate("missing", &Subject{DistinctID: "u"})
	if r.Enabled || !r.Inconclusive() || r.Reason != ReasonUnknownFlag || r.Key != "missing" {
		t.Errorf("unknown: %+v", r)
	}
}

func TestStoreSwapsAtomically(t *testing.T) {
	a := mustParse(t, `{"flags": [{"key": "x", "active": true, "filters": {"groups": [{}]}}, {"key": "y", "active": true, "filters": {"groups": [{}]}}]}`)
	b := mustParse(t, `{"flags": [{"key": "x", "active": false}, {"key": "y", "active": false}]}`)
	st := NewStore()
	if st.Load().Len() != 0 {
		t.Fatal("a new store must hold no flags")
	}
	st.Swap(a)
	g1 := st.Load().Generation()
	var wg sync.WaitGroup
	var swaps atomic.Int64
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if i%2 == 0 {
				st.Swap(b)
			} else {
				st.Swap(a)
			}
			swaps.Add(1)
		}
	}()
	s := &Subject{DistinctID: "u"}
	// Read until many swaps have happened under the reader.
	for reads := 0; swaps.Load() < 2000 || reads < 20000; reads++ {
		d := st.Load()
		x, y := d.Evaluate("x", s), d.Evaluate("y", s)
		if x.Enabled != y.Enabled {
			t.Fatalf("read half of a swap: x=%v y=%v", x.Enabled, y.Enabled)
		}
	}
	close(stop)
	wg.Wait()
	if got := st.Load().Generation(); got < g1+2000 {
		t.Errorf("generation %d after 2000 swaps from %d", got, g1)
	}
	if a.Generation() != 0 {
		t.Error("Swap modified the definitions it was given")
	}
}

func TestNeverLocal(t *testing.T) {
	d := mustParse(t, `{"flags": [
		{"key": "fine", "active": true, "filters": {"groups": [{"properties": [{"key": "a", "value": "x"}]}, {"properties": [{"key": "id", "type": "cohort", "value": 9}]}]}},
		{"key": "continuity", "active": true, "ensure_experience_continuity": true, "filters": {"groups": [{}]}},
		{"key": "static-first", "active": true, "filters": {"groups": [{"properties": [{"key": "id", "type": "cohort", "value": 9}]}, {}]}},
		{"key": "all-unknown", "active": true, "filters": {"groups": [{"properties": [{"key": "a", "operator": "between", "value": [1, 2]}]}, {"properties": [{"key": "b", "operator": "is_not_set"}]}]}},
		{"key": "partly-unknown", "active": true, "filters": {"groups": [{"properties": [{"key": "a", "operator": "between", "value": [1, 2]}]}, {}]}},
		{"key": "orphan-group", "active": true, "filters": {"aggregation_group_type_index": 3, "groups": [{}]}}
	]}`)
	want := map[string]string{
		"fine": "", "partly-unknown": "",
		"continuity": "experience continuity", "static-first": "static cohort (9)",
		"all-unknown": "every condition", "orphan-group": "group type index 3",
	}
	for key, w := range want {
		f, _ := d.Flag(key)
		got := f.NeverLocal()
		if (w == "") != (got == "") || !strings.Contains(got, w) {
			t.Errorf("%s: NeverLocal() = %q, want %q", key, got, w)
		}
	}
}

func TestActiveAndContinuityAreReadWithPythonTruthiness(t *testing.T) {
	flag := func(key, field, raw string) string {
		return fmt.Sprintf(`{"key": %q, %s "filters": {"groups": [{"rollout_percentage": 100}]}}`, key, field+raw)
	}
	cases := []struct {
		active string // the "active" member, "" for none
		want   Reason
	}{
		{``, ReasonDisabled},
		{`"active": null,`, ReasonDisabled},
		{`"active": false,`, ReasonDisabled},
		{`"active": 0,`, ReasonDisabled},
		{`"active": "",`, ReasonDisabled},
		{`"active": [],`, ReasonDisabled},
		{`"active": {},`, ReasonDisabled},
		{`"active": true,`, ReasonConditionMatch},
		{`"active": 1,`, ReasonConditionMatch},
		{`"active": "false",`, ReasonConditionMatch}, // a non-empty string is true in python
	}
	var flags []string
	for i, c := range cases {
		flags = append(flags, flag(fmt.Sprint("f", i), c.active, ""))
	}
	flags = append(flags,
		flag("continuity-null", `"active": true, "ensure_experience_continuity": null,`, ""),
		flag("continuity-one", `"active": true, "ensure_experience_continuity": 1,`, ""))
	d := mustParse(t, `{"flags": [`+strings.Join(flags, ",")+`]}`)
	if len(d.Problems()) != 0 {
		t.Errorf("non-boolean switches are not malformed: %v", d.Problems())
	}
	s := &Subject{DistinctID: "u"}
	for i, c := range cases {
		if r := d.Evaluate(fmt.Sprint("f", i), s); r.Reason != c.want {
			t.Errorf("%s: got %s (%s), want %s", c.active, r.Value(), r.Reason, c.want)
		}
	}
	if r := d.Evaluate("continuity-null", s); r.Reason != ReasonConditionMatch {
		t.Errorf("ensure_experience_continuity null: got %s", r.Reason)
	}
	if r := d.Evaluate("continuity-one", s); r.Reason != ReasonExperienceContinuity {
		t.Errorf("ensure_experience_continuity 1: got %s", r.Reason)
	}
}

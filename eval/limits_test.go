package eval

import (
	"fmt"
	"strings"
	"testing"
)

// dependsOn is a flag whose one condition is "flag dep evaluates to true".
func dependsOn(key, dep string) string {
	return fmt.Sprintf(`{"key": %q, "active": true, "filters": {"groups": [{"properties": [
		{"key": %q, "type": "flag", "operator": "flag_evaluates_to", "value": true, "dependency_chain": [%q]}], "rollout_percentage": 100}]}}`, key, dep, dep)
}

// A flag on a dependency cycle, and every flag depending on one, can never be
// decided locally: NeverLocal says so with the cycle's path, a warning points
// at the filter, and evaluation answers dependency_cycle.
func TestDependencyCyclesAreNeverLocalWithTheirPath(t *testing.T) {
	d := mustParse(t, `{"flags": [`+strings.Join([]string{
		dependsOn("a", "b"), dependsOn("b", "a"),
		dependsOn("x", "y"), dependsOn("y", "z"), dependsOn("z", "x"),
		dependsOn("self", "self"),
		dependsOn("uses-a", "a"), dependsOn("uses-uses-a", "uses-a"),
		dependsOn("uses-missing", "nowhere"),
		dependsOn("uses-plain", "plain"),
		`{"key": "plain", "active": true, "filters": {"groups": [{"rollout_percentage": 100}]}}`,
	}, ",")+`]}`)
	want := map[string]string{
		"a":            "circular flag dependency: a -> b -> a",
		"b":            "circular flag dependency: b -> a -> b",
		"x":            "circular flag dependency: x -> y -> z -> x",
		"y":            "circular flag dependency: y -> z -> x -> y",
		"z":            "circular flag dependency: z -> x -> y -> z",
		"self":         "circular flag dependency: self -> self",
		"uses-a":       `depends on flag "a", which can never be evaluated locally`,
		"uses-uses-a":  `depends on flag "uses-a", which can never be evaluated locally`,
		"uses-missing": `depends on flag "nowhere", which is not defined`,
		"uses-plain":   "",
		"plain":        "",
	}
	subj := &Subject{DistinctID: "someone"}
	for key, why := range want {
		f, _ := d.Flag(key)
		got := f.NeverLocal()
		if (why == "") != (got == "") || !strings.Contains(got, why) {
			t.Errorf("NeverLocal(%s) = %q, want it to say %q", key, got, why)
		}
		r := d.Evaluate(key, subj)
		switch {
		case why == "" && (!r.Enabled || r.Reason != ReasonConditionMatch):
			t.Errorf("%s: %+v, want a match", key, r)
		case strings.Contains(why, "circular") || strings.Contains(why, `"a"`) || strings.Contains(why, `"uses-a"`):
			if r.Reason != ReasonDependencyCycle {
				t.Errorf("%s: reason %v, want %v", key, r.Reason, ReasonDependencyCycle)
			}
		case strings.Contains(why, "not defined") && r.Reason != ReasonMissingDependency:
			t.Errorf("%s: reason %v, want %v", key, r.Reason, ReasonMissingDependency)
		}
	}
	warned := map[string]string{}
	for _, w := range d.Warnings() {
		warned[w.Flag] += w.Path + ": " + w.Message + "\n"
	}
	for _, key := range []string{"a", "b", "x", "self"} {
		if !strings.Contains(warned[key], "dependency cycle "+strings.TrimPrefix(want[key], "circular flag dependency: ")) ||
			!strings.Contains(warned[key], ".filters.groups[0].properties[0]") {
			t.Errorf("warnings for %s: %q", key, warned[key])
		}
	}
	if !strings.Contains(warned["uses-missing"], `"nowhere"`) {
		t.Errorf("the missing dependency is not warned about under its flag: %q", warned["uses-missing"])
	}
}

// A cycle through a flag that is not the first filter of its condition leaves
// the flag decidable for some inputs: "partly" local, with the warning.
func TestADependencyCycleBehindAnotherFilterIsWarnedAbout(t *testing.T) {
	d := mustParse(t, `{"flags": [`+dependsOn("b", "a")+`,
		{"key": "a", "active": true, "filters": {"groups": [{"properties": [
			{"key": "plan", "value": "pro"},
			{"key": "b", "type": "flag", "operator": "flag_evaluates_to", "value": true, "dependency_chain": ["b"]}]}]}}]}`)
	a, _ := d.Flag("a")
	if why := a.NeverLocal(); why != "" {
		t.Errorf("NeverLocal(a) = %q; a free user is decided (false) locally", why)
	}
	if r := d.Evaluate("a", &Subject{DistinctID: "u", Person: Properties{{Key: "plan", Value: String("free")}}}); r.Reason.Inconclusive() {
		t.Errorf("free user: %+v", r)
	}
	if r := d.Evaluate("a", &Subject{DistinctID: "u", Person: Properties{{Key: "plan", Value: String("pro")}}}); r.Reason != ReasonDependencyCycle {
		t.Errorf("pro user: %+v, want %v", r, ReasonDependencyCycle)
	}
	found := false
	for _, w := range d.Warnings() {
		found = found || (w.Flag == "a" && strings.Contains(w.Message, "a -> b -> a"))
	}
	if !found {
		t.Errorf("no warning with the cycle for a: %v", d.Warnings())
	}
}

// chainDocument is n flags, each depending on the next; the last compares a
// date, so every flag's answer depends on the clock.
func chainDocument(n int) string {
	var b strings.Builder
	b.WriteString(`{"flags": [`)
	for i := 0; i < n-1; i++ {
		b.WriteString(dependsOn(fmt.Sprintf("f%d", i), fmt.Sprintf("f%d", i+1)))
		b.WriteString(",")
	}
	fmt.Fprintf(&b, `{"key": "f%d", "active": true, "filters": {"groups": [{"properties": [{"key": "signup", "operator": "is_date_after", "value": "-30d"}]}]}}]}`, n-1)
	return b.String()
}

// Evaluation follows dependencies recursively, so their depth is bounded: a
// flag beyond MaxDependencyDepth is malformed and answers at once, and every
// flag within it still evaluates through its chain.
func TestDependencyDepthIsBounded(t *testing.T) {
	const n = 200
	d := mustParse(t, chainDocument(n))
	broken := 0
	for i := 0; i < n; i++ {
		f, _ := d.Flag(fmt.Sprintf("f%d", i))
		depth := n - 1 - i
		if (f.Broken() != "") != (depth > MaxDependencyDepth) {
			t.Errorf("f%d, %d deep: broken %q", i, depth, f.Broken())
		}
		if f.Broken() != "" {
			broken++
			if !strings.Contains(f.Broken(), fmt.Sprintf("limit of %d", MaxDependencyDepth)) ||
				!strings.Contains(f.Broken(), fmt.Sprintf("f%d -> f%d", i, i+1)) {
				t.Errorf("f%d: %q names neither the limit nor the chain", i, f.Broken())
			}
		}
		if !f.usesClock {
			t.Errorf("f%d depends on a date filter but is not marked as using the clock", i)
		}
	}
	if got := len(d.Problems()); got != broken {
		t.Errorf("%d problems for %d flags over the limit", got, broken)
	}
	deepest := fmt.Sprintf("f%d", n-1-MaxDependencyDepth)
	subj := &Subject{DistinctID: "u", Person: Properties{{Key: "signup", Value: String("2999-01-01")}}}
	if r := d.Evaluate(deepest, subj); !r.Enabled || r.Reason != ReasonConditionMatch {
		t.Errorf("%s, at the limit: %+v", deepest, r)
	}
	if r := d.Evaluate("f0", subj); r.Reason != ReasonInvalidDefinition {
		t.Errorf("f0, over the limit: %+v", r)
	}
}

// cohortChain is a flag on cohort 0, where cohort i is "in cohort i+1" and
// the last is a property filter.
func cohortChain(n int) string {
	var b strings.Builder
	b.WriteString(`{"flags": [{"key": "f", "active": true, "filters": {"groups": [{"properties": [{"key": "id", "type": "cohort", "value": 0}]}]}}], "cohorts": {`)
	for i := 0; i < n-1; i++ {
		fmt.Fprintf(&b, `"%d": {"type": "AND", "values": [{"key": "id", "type": "cohort", "value": %d}]},`, i, i+1)
	}
	fmt.Fprintf(&b, `"%d": {"type": "AND", "values": [{"key": "plan", "value": "pro"}]}}}`, n-1)
	return b.String()
}

// Cohorts referring to cohorts nest like property groups: a chain beyond
// the limit is left to PostHog's server instead of being compiled (and
// evaluated, on every request) recursively.
func TestCohortChainsAreBounded(t *testing.T) {
	pro := &Subject{DistinctID: "u", Person: Properties{{Key: "plan", Value: String("pro")}}}
	short := mustParse(t, cohortChain(10))
	if r := short.Evaluate("f", pro); !r.Enabled {
		t.Errorf("a chain of 10 cohorts: %+v", r)
	}
	long := mustParse(t, cohortChain(50_000))
	if r := long.Evaluate("f", pro); !r.Reason.Inconclusive() {
		t.Errorf("a chain of 50000 cohorts: %+v, want inconclusive", r)
	}
	found := false
	for _, w := range long.Warnings() {
		found = found || strings.Contains(w.Message, fmt.Sprintf("nest deeper than %d", maxCohortDepth))
	}
	if !found {
		t.Errorf("no warning names the nesting limit: %v", long.Warnings())
	}
}

// BenchmarkParseDependencyChain parses a chain of flags each depending on the
// next; analysing the dependency graph is linear in its size.
func BenchmarkParseDependencyChain(b *testing.B) {
	for _, n := range []int{2_000, 20_000} {
		doc := []byte(chainDocument(n))
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			b.SetBytes(int64(len(doc)))
			for i := 0; i < b.N; i++ {
				if _, err := Parse(doc); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

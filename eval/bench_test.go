package eval

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
)

// Benchmarks for the evaluator's hot path. Run with:
//
//	go test -run '^$' -bench . -benchmem ./eval/
//
// Distinct ids rotate through benchIDs so no run measures a single warm input.

var benchIDs = func() []string {
	ids := make([]string, 1024)
	for i := range ids {
		ids[i] = "user-" + strconv.Itoa(100000+i*7919)
	}
	return ids
}()

const benchRollout = `{"flags": [{"id": 1, "key": "simple-flag", "active": true,
	"filters": {"groups": [{"properties": [], "rollout_percentage": 45}]}}]}`

const benchMultivariate = `{"flags": [{"id": 2, "key": "multivariate-flag", "active": true,
	"filters": {"groups": [{"properties": [], "rollout_percentage": 100}],
	"multivariate": {"variants": [
		{"key": "first-variant", "rollout_percentage": 50},
		{"key": "second-variant", "rollout_percentage": 20},
		{"key": "third-variant", "rollout_percentage": 20},
		{"key": "fourth-variant", "rollout_percentage": 5},
		{"key": "fifth-variant", "rollout_percentage": 5}]}}}]}`

const benchFiveFilters = `{"flags": [{"id": 3, "key": "filtered-flag", "active": true,
	"filters": {"groups": [{"properties": [
		{"key": "country", "operator": "exact", "value": ["US", "CA", "GB"], "type": "person"},
		{"key": "email", "operator": "icontains", "value": "@example.com", "type": "person"},
		{"key": "path", "operator": "regex", "value": "^/checkout(/|$)", "type": "person"},
		{"key": "orders", "operator": "gt", "value": 3, "type": "person"},
		{"key": "app_version", "operator": "semver_gte", "value": "2.4.0", "type": "person"}
	], "rollout_percentage": 80}]}}]}`

var benchPerson = Properties{
	{Key: "country", Value: String("us")},
	{Key: "email", Value: String("Jane.Doe@Example.com")},
	{Key: "path", Value: String("/checkout/payment")},
	{Key: "orders", Value: String("12")},
	{Key: "app_version", Value: String("2.10.1")},
	{Key: "plan", Value: String("pro")},
}

// fiftyFlags is a realistic mix: rollouts, multivariate flags, flags with
// property filters of every common kind.
func fiftyFlags() string {
	var flags []string
	for i := 0; i < 50; i++ {
		key := "flag-" + strconv.Itoa(i)
		var filters string
		switch i % 5 {
		case 0:
			filters = fmt.Sprintf(`{"groups": [{"rollout_percentage": %d}]}`, 10+i)
		case 1:
			filters = `{"groups": [{"rollout_percentage": 100}], "multivariate": {"variants": [
				{"key": "control", "rollout_percentage": 34}, {"key": "a", "rollout_percentage": 33}, {"key": "b", "rollout_percentage": 33}]}}`
		case 2:
			filters = `{"groups": [{"properties": [{"key": "plan", "value": ["pro", "enterprise"]}], "rollout_percentage": 50},
				{"properties": [{"key": "email", "operator": "ends_with", "value": "@example.com"}]}]}`
		case 3:
			filters = `{"groups": [{"properties": [{"key": "orders", "operator": "gte", "value": 5},
				{"key": "country", "operator": "is_not", "value": "FR"}], "rollout_percentage": 75}]}`
		case 4:
			filters = `{"groups": [{"properties": [{"key": "app_version", "operator": "semver_caret", "value": "2.0.0"},
				{"key": "path", "operator": "regex", "value": "^/(checkout|cart)"}]}],
				"multivariate": {"variants": [{"key": "control", "rollout_percentage": 50}, {"key": "test", "rollout_percentage": 50}]}}`
		}
		flags = append(flags, fmt.Sprintf(`{"id": %d, "key": %q, "active": true, "filters": %s}`, i+1, key, filters))
	}
	return `{"flags": [` + strings.Join(flags, ",") + `]}`
}

func benchSet(b *testing.B, doc string) *FlagSet {
	b.Helper()
	d := mustParse(b, doc)
	if len(d.Problems()) > 0 {
		b.Fatalf("problems: %v", d.Problems())
	}
	st := NewStore()
	st.Swap(d)
	return st.Load().FlagSet(nil)
}

func benchmarkSet(b *testing.B, doc string, person Properties) {
	set := benchSet(b, doc)
	var r Results
	s := Subject{Person: person}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		s.DistinctID = benchIDs[i&1023]
		set.Evaluate(&s, &r)
	}
	if r.Len() != set.Len() {
		b.Fatalf("got %d results", r.Len())
	}
}

// BenchmarkRolloutFlag: one flag, 45 % rollout, no properties.
func BenchmarkRolloutFlag(b *testing.B) { benchmarkSet(b, benchRollout, nil) }

// BenchmarkRolloutFlagByKey: the same through Definitions.Evaluate (a key lookup
// and a full Result).
func BenchmarkRolloutFlagByKey(b *testing.B) {
	d := mustParse(b, benchRollout)
	s := Subject{}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		s.DistinctID = benchIDs[i&1023]
		d.Evaluate("simple-flag", &s)
	}
}

// BenchmarkMultivariateFlag: five variants (50/20/20/5/5), full rollout.
func BenchmarkMultivariateFlag(b *testing.B) { benchmarkSet(b, benchMultivariate, nil) }

// BenchmarkFivePropertyFilters: exact (list), icontains, regex, gt, semver_gte.
func BenchmarkFivePropertyFilters(b *testing.B) { benchmarkSet(b, benchFiveFilters, benchPerson) }

const (
	// The same test, "the email's domain is example.com", written for RE2 and
	// with a look-behind, which only the backtracking engine runs.
	benchRE2Regex = `{"flags": [{"id": 4, "key": "regex-flag", "active": true,
	"filters": {"groups": [{"properties": [
		{"key": "email", "operator": "regex", "value": "(?i)@example\\.com$", "type": "person"}
	], "rollout_percentage": 80}]}}]}`
	benchLookaroundRegex = `{"flags": [{"id": 5, "key": "lookaround-flag", "active": true,
	"filters": {"groups": [{"properties": [
		{"key": "email", "operator": "regex", "value": "(?i)(?<=@)example\\.com$", "type": "person"}
	], "rollout_percentage": 80}]}}]}`
	// Exponential backtracking on any value without a "y": every evaluation
	// runs out of RegexMatchTimeout, twice.
	benchPathologicalRegex = `{"flags": [{"id": 6, "key": "pathological-flag", "active": true,
	"filters": {"groups": [{"properties": [
		{"key": "path", "operator": "regex", "value": "(x+x+)+y(?=z)", "type": "person"}
	], "rollout_percentage": 80}]}}]}`
)

// benchmarkRegexSet is benchmarkSet for a one-flag document, after checking
// that the flag's filter gives the expected kind of answer.
func benchmarkRegexSet(b *testing.B, doc string, person Properties, want Reason) {
	d := mustParse(b, doc)
	f := d.Flags()[0]
	n := 16
	if want.Inconclusive() {
		n = 1
	}
	matched := 0
	for _, id := range benchIDs[:n] {
		r := d.EvaluateFlag(f, &Subject{DistinctID: id, Person: person})
		switch {
		case r.Reason == want:
			matched++
		case want == ReasonConditionMatch && r.Reason == ReasonNoConditionMatch:
			// outside the 80 % rollout
		default:
			b.Fatalf("%s for %s: got %s, want %s", f.Key, id, r.Reason, want)
		}
	}
	if matched == 0 {
		b.Fatalf("%s: no subject got %s", f.Key, want)
	}
	benchmarkSet(b, doc, person)
}

// BenchmarkRE2RegexFilter: one regex filter RE2 runs (the baseline for the
// look-around benchmark below).
func BenchmarkRE2RegexFilter(b *testing.B) {
	benchmarkRegexSet(b, benchRE2Regex, benchPerson, ReasonConditionMatch)
}

// BenchmarkLookaroundRegexFilter: the same filter with a look-behind, on the
// backtracking engine.
func BenchmarkLookaroundRegexFilter(b *testing.B) {
	benchmarkRegexSet(b, benchLookaroundRegex, benchPerson, ReasonConditionMatch)
}

// BenchmarkPathologicalRegexFilter: a catastrophically backtracking pattern,
// bounded by RegexMatchTimeout; the answer is inconclusive (regex_timeout).
func BenchmarkPathologicalRegexFilter(b *testing.B) {
	person := Properties{{Key: "path", Value: String(strings.Repeat("x", 40))}}
	benchmarkRegexSet(b, benchPathologicalRegex, person, ReasonRegexTimeout)
}

// BenchmarkFiftyFlags: 50 mixed flags for one subject.
func BenchmarkFiftyFlags(b *testing.B) { benchmarkSet(b, fiftyFlags(), benchPerson) }

// BenchmarkCacheHit: the 50 flags answered from the result cache, for the
// subject of DESIGN.md's example Caddyfile (distinct id and device id from the
// posthog-js cookie, one person property, one group with one property) and for a
// subject with six person properties.
func BenchmarkCacheHit(b *testing.B) {
	typical := func(id string) Subject {
		return Subject{DistinctID: id, DeviceID: "0190a1b2-c3d4-7e5f-8a9b-" + id,
			Person: Properties{{Key: "plan", Value: String("pro")}},
			Groups: []Group{{Type: "company", Key: "acme", Properties: Properties{{Key: "tier", Value: String("gold")}}}}}
	}
	six := func(id string) Subject { return Subject{DistinctID: id, Person: benchPerson} }
	for _, bc := range []struct {
		name    string
		subject func(string) Subject
	}{{"typical", typical}, {"six-properties", six}} {
		b.Run(bc.name, func(b *testing.B) {
			set := benchSet(b, fiftyFlags())
			c := NewCache(4096)
			c.SetMinCost(0) // cache these 50 flags (by default a set this cheap is evaluated directly)
			subjects := make([]Subject, len(benchIDs))
			var r Results
			for i := range subjects {
				subjects[i] = bc.subject(benchIDs[i])
				c.Evaluate(set, &subjects[i], &r)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				c.Evaluate(set, &subjects[i&1023], &r)
			}
			if hits, _, _ := c.Stats(); hits == 0 {
				b.Fatal("no cache hits")
			}
		})
	}
}

// BenchmarkParseFiftyFlags: compiling definitions (once per poll, not per request).
func BenchmarkParseFiftyFlags(b *testing.B) {
	doc := []byte(fiftyFlags())
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse(doc); err != nil {
			b.Fatal(err)
		}
	}
}

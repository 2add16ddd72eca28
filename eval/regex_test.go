package eval

import (
	"slices"
	"strings"
	"testing"
	"time"
)

// regexWorstCase bounds one regex filter on the backtracking engine: two
// attempts of RegexMatchTimeout, each overshooting by up to two ticks of
// regexp2's clock. Tests allow generous slack on top, for loaded machines and
// the race detector.
const regexWorstCase = 2 * (RegexMatchTimeout + 2*regexClockPeriod)

func TestPathologicalRegexesAreInconclusiveNotStalls(t *testing.T) {
	for _, c := range []struct{ pattern, value string }{
		{`(x+x+)+y(?=z)`, strings.Repeat("x", 40)},
		{`^(?=(a|aa)+$)`, strings.Repeat("a", 60) + "b"},
		{`(a+)+$(?!x)`, strings.Repeat("a", 40) + "b"},
		{`(.*a){20}(?=b)`, strings.Repeat("a", 40)},
	} {
		for _, op := range []string{"regex", "not_regex"} {
			d := flagWithFilter(t, `{"key":"p","operator":"`+op+`","value":`+jsonString(c.pattern)+`}`)
			start := time.Now()
			r := d.Evaluate("f", &Subject{DistinctID: "u", Person: Properties{{Key: "p", Value: String(c.value)}}})
			elapsed := time.Since(start)
			if r.Reason != ReasonRegexTimeout || r.Enabled {
				t.Errorf("%s %q: got %s (%s), want inconclusive regex_timeout", op, c.pattern, r.Value(), r.Reason)
			}
			if elapsed < RegexMatchTimeout {
				t.Errorf("%s %q: timed out after %v, before the %v limit", op, c.pattern, elapsed, RegexMatchTimeout)
			}
			if elapsed > regexWorstCase+time.Second {
				t.Errorf("%s %q: took %v, far beyond the %v bound", op, c.pattern, elapsed, regexWorstCase)
			}
		}
	}
}

func TestRegexTimeoutIsAnInconclusiveReason(t *testing.T) {
	if !ReasonRegexTimeout.Inconclusive() || ReasonRegexTimeout.String() != "regex_timeout" {
		t.Fatalf("ReasonRegexTimeout: %q, inconclusive %v", ReasonRegexTimeout, ReasonRegexTimeout.Inconclusive())
	}
	// Reasons() is what per-reason metrics are built from.
	if !slices.Contains(Reasons(), ReasonRegexTimeout) {
		t.Errorf("Reasons() lacks regex_timeout: %v", Reasons())
	}
}

func TestBacktrackingRegexesNamesWhatRE2CannotRun(t *testing.T) {
	d := mustParse(t, `{"flags": [
		{"key": "re2", "active": true, "filters": {"groups": [{"properties": [
			{"key": "path", "operator": "regex", "value": "^/checkout(/|$)"},
			{"key": "name", "operator": "regex", "value": "\\bjane\\b"}]}]}},
		{"key": "lookaround", "active": true, "filters": {"groups": [
			{"properties": [{"key": "email", "operator": "regex", "value": "(?<=@)example\\.com$"}]},
			{"properties": [{"key": "email", "operator": "not_regex", "value": "(?<=@)example\\.com$"},
				{"key": "id", "operator": "regex", "value": "(a|b){1001}"}]}]}},
		{"key": "via-cohort", "active": true, "filters": {"groups": [{"properties": [{"key": "id", "type": "cohort", "value": 1}]}]}},
		{"key": "invalid", "active": true, "filters": {"groups": [{"properties": [{"key": "p", "operator": "regex", "value": "\\pL"}]}]}}
	], "cohorts": {"1": {"type": "AND", "values": [{"key": "p", "operator": "regex", "value": "(\\w)\\1"}]}}}`)
	want := map[string][]string{
		"re2":        nil,
		"lookaround": {`(?<=@)example\.com$`, `(a|b){1001}`},
		"via-cohort": {`(\w)\1`},
		"invalid":    nil,
	}
	for key, patterns := range want {
		f, _ := d.Flag(key)
		if got := f.BacktrackingRegexes(); !slices.Equal(got, patterns) {
			t.Errorf("%s: BacktrackingRegexes() = %q, want %q", key, got, patterns)
		}
	}
	text := ""
	for _, w := range d.Warnings() {
		text += w.String() + "\n"
	}
	for _, wantText := range []string{`"lookaround"`, "backtracking engine", "regex_timeout", `"invalid"`, "never matches"} {
		if !strings.Contains(text, wantText) {
			t.Errorf("warnings lack %q:\n%s", wantText, text)
		}
	}
	if strings.Contains(text, `"re2"`) {
		t.Errorf("RE2 patterns warned about:\n%s", text)
	}
	// A look-around filter costs more than an RE2 one in the cache's estimate.
	re2, _ := d.Flag("re2")
	slow, _ := d.Flag("lookaround")
	if slow.cost <= re2.cost+backtrackingRegexCost {
		t.Errorf("cost estimate: look-around flag %d, RE2 flag %d", slow.cost, re2.cost)
	}
}

// TestRE2DeparturesAreGuarded: on the values where RE2's meaning of "$",
// \b, \B, \d, \w and \s differs from python's, another program answers;
// RE2's main program keeps every other value.
func TestRE2DeparturesAreGuarded(t *testing.T) {
	for _, c := range []struct {
		pattern string
		guard   regexGuard
		values  map[string]bool // value -> python's re.search
	}{
		{`^/checkout(/|$)`, guardFinalNewline, map[string]bool{"/checkout": true, "/checkout\n": true, "/checkout\n\n": false, "/checkouts": false}},
		{`\bjane\b`, guardUnicodeBoundary, map[string]bool{"jane doe": true, "éjane": false, "jane": true, "janeé": false}},
		{`a\B`, guardUnicodeBoundary | guardEmptyValue, map[string]bool{"ab": true, "aé": true, "a": false, "": false}},
		{`(?a)x\B`, guardEmptyValue, map[string]bool{"xé": false, "xy": true}},
		{`^\d+$`, guardUnicodeClasses | guardFinalNewline, map[string]bool{"123": true, "١٢٣": true, "12a": false, "١٢x": false, "12\n": true}},
		{`^\w\s\W$`, guardUnicodeClasses | guardFinalNewline, map[string]bool{"a\v-": true, "a\x1c-": true, "é\u3000-": true, "a é": false}},
		{`(?a)^\w\s$`, guardFinalNewline, map[string]bool{"a\v": true, "é ": false, "a\x1c": false}},
	} {
		cr, why := compileRegex(c.pattern)
		if cr.state != regexRE2 || cr.guard != c.guard {
			t.Errorf("%q: state %d guard %b (%s), want RE2 with guard %b", c.pattern, cr.state, cr.guard, why, c.guard)
			continue
		}
		if (c.guard&^guardUnicodeClasses != 0) != (cr.bt != nil) || (c.guard&guardUnicodeClasses != 0) != (cr.re2Unicode != nil) {
			t.Errorf("%q: backtracking program %v, Unicode RE2 program %v", c.pattern, cr.bt != nil, cr.re2Unicode != nil)
		}
		for v, want := range c.values {
			if got, reason := cr.match(v); got != want || reason != 0 {
				t.Errorf("%q on %q: got %v (%s), want %v", c.pattern, v, got, reason, want)
			}
		}
	}
	// The ordinary case: no guard, one comparison on the hot path.
	if cr, _ := compileRegex(`^/(checkout|cart)`); cr.state != regexRE2 || cr.guard != 0 || cr.bt != nil || cr.re2Unicode != nil {
		t.Errorf("^/(checkout|cart): state %d guard %b", cr.state, cr.guard)
	}
}

func jsonString(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch r {
		case '"', '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

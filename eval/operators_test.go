package eval

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// flagWithFilter builds a one-flag document whose single condition (rollout 100)
// holds the given property filter JSON.
func flagWithFilter(t *testing.T, filterJSON string) *Definitions {
	t.Helper()
	doc := fmt.Sprintf(`{"flags":[{"id":1,"key":"f","active":true,"filters":{"groups":[{"properties":[%s],"rollout_percentage":100}]}}]}`, filterJSON)
	d, err := Parse([]byte(doc))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if len(d.Problems()) > 0 {
		t.Fatalf("problems: %v", d.Problems())
	}
	return d
}

type opCase struct {
	filter string
	value  Value
	want   string // "true", "false" or "inconclusive"
}

func outcomeOf(r Result) string {
	if r.Inconclusive() {
		return "inconclusive"
	}
	return r.Value()
}

func runOpCases(t *testing.T, cases []opCase) {
	t.Helper()
	for _, c := range cases {
		d := flagWithFilter(t, c.filter)
		s := &Subject{DistinctID: "u", Person: Properties{{Key: "p", Value: c.value}}, Now: time.Date(2022, 3, 31, 12, 0, 0, 0, time.UTC)}
		if got := outcomeOf(d.Evaluate("f", s)); got != c.want {
			t.Errorf("filter %s with p=%s (%v): got %s, want %s", c.filter, c.value.Text(), c.value.Kind(), got, c.want)
		}
	}
}

func TestExactFollowsTheFlagsService(t *testing.T) {
	runOpCases(t, []opCase{
		// Boolean-like filter values compare truthiness.
		{`{"key":"p","operator":"exact","value":true}`, String("TRUE"), "true"},
		{`{"key":"p","operator":"exact","value":"True"}`, Bool(true), "true"},
		{`{"key":"p","operator":"exact","value":"false"}`, String("no"), "true"},
		{`{"key":"p","operator":"exact","value":false}`, Bool(true), "false"},
		{`{"key":"p","operator":"exact","value":["true","TRUE"]}`, String("true"), "true"},
		{`{"key":"p","operator":"is_not","value":true}`, String("yes"), "true"},
		// Full Unicode lower-casing, not folding.
		{`{"key":"p","operator":"exact","value":"ΟΔΟΣ"}`, String("οδος"), "true"},
		{`{"key":"p","operator":"exact","value":"Straße"}`, String("STRASSE"), "false"},
		{`{"key":"p","operator":"exact","value":"İstanbul"}`, String("i̇stanbul"), "true"},
		// Numbers are stringified like serde_json.
		{`{"key":"p","operator":"exact","value":1}`, String("1"), "true"},
		{`{"key":"p","operator":"exact","value":1.0}`, String("1"), "false"},
		{`{"key":"p","operator":"exact","value":1.0}`, String("1.0"), "true"},
		{`{"key":"p","operator":"exact","value":[1, 2]}`, Int(2), "true"},
		// null is "None" to exact, as in posthog-python.
		{`{"key":"p","operator":"is_not","value":"none"}`, Null(), "false"},
		{`{"key":"p","operator":"is_not","value":"x"}`, Null(), "true"},
		{`{"key":"p","operator":"exact","value":"none"}`, Null(), "false"},
		// Missing operator means exact.
		{`{"key":"p","value":"A"}`, String("a"), "true"},
	})
}

func TestStringOperatorsLowerASCIIOnly(t *testing.T) {
	runOpCases(t, []opCase{
		{`{"key":"p","operator":"icontains","value":"EXAMPLE"}`, String("me@example.com"), "true"},
		{`{"key":"p","operator":"icontains","value":"ä"}`, String("Ä"), "false"},
		{`{"key":"p","operator":"not_icontains","value":"x"}`, String("abc"), "true"},
		{`{"key":"p","operator":"starts_with","value":"HTTPS"}`, String("https://a"), "true"},
		{`{"key":"p","operator":"not_starts_with","value":"http"}`, String("ftp://a"), "true"},
		{`{"key":"p","operator":"ends_with","value":".COM"}`, String("a.com"), "true"},
		{`{"key":"p","operator":"not_ends_with","value":".com"}`, String("a.com"), "false"},
		{`{"key":"p","operator":"icontains","value":1}`, Int(10), "true"},
		{`{"key":"p","operator":"icontains","value":"true"}`, Bool(true), "true"},
		{`{"key":"p","operator":"icontains","value":"x"}`, Null(), "false"},
	})
}

// TestRegexOperators: python's re.search, whichever engine runs the pattern.
// Every expectation is what Python 3.11's re answers (an invalid pattern is
// false for both operators; one re.compile raises on otherwise is
// inconclusive, as in posthog-python).
func TestRegexOperators(t *testing.T) {
	runOpCases(t, []opCase{
		{`{"key": "p", "operator": "regex", "value": "^v[0-9]+$"}`, String("v12"), "true"},
		{`{"key": "p", "operator": "not_regex", "value": "^v[0-9]+$"}`, String("v12"), "false"},
		{`{"key": "p", "operator": "regex", "value": "b"}`, String("abc"), "true"}, // search, not full match
		{`{"key": "p", "operator": "not_regex", "value": "b"}`, String("abc"), "false"},
		{`{"key": "p", "operator": "regex", "value": "(?=a)a"}`, String("a"), "true"}, // look-ahead: RE2 refuses it, python evaluates it
		{`{"key": "p", "operator": "not_regex", "value": "(?=a)a"}`, String("a"), "false"},
		{`{"key": "p", "operator": "regex", "value": "(?<!x)y"}`, String("xy"), "false"},
		{`{"key": "p", "operator": "not_regex", "value": "(?<!x)y"}`, String("xy"), "true"},
		{`{"key": "p", "operator": "regex", "value": "(?<=@)example\\.com$"}`, String("jane@example.com"), "true"}, // look-behind
		{`{"key": "p", "operator": "not_regex", "value": "(?<=@)example\\.com$"}`, String("jane@example.com"), "false"},
		{`{"key": "p", "operator": "regex", "value": "(a)\\1"}`, String("aa"), "true"}, // back-reference
		{`{"key": "p", "operator": "not_regex", "value": "(a)\\1"}`, String("aa"), "false"},
		{`{"key": "p", "operator": "regex", "value": "(?P<d>\\d)(?P=d)"}`, String("a11"), "true"},
		{`{"key": "p", "operator": "not_regex", "value": "(?P<d>\\d)(?P=d)"}`, String("a11"), "false"},
		{`{"key": "p", "operator": "regex", "value": "(a|b){1001}"}`, String(strings.Repeat("ab", 501)), "true"}, // more than RE2's 1000 repetitions
		{`{"key": "p", "operator": "not_regex", "value": "(a|b){1001}"}`, String(strings.Repeat("ab", 501)), "false"},
		{`{"key": "p", "operator": "regex", "value": "(a|b){1001}"}`, String(strings.Repeat("ab", 500)), "false"},
		{`{"key": "p", "operator": "not_regex", "value": "(a|b){1001}"}`, String(strings.Repeat("ab", 500)), "true"},
		{`{"key": "p", "operator": "regex", "value": "a++a"}`, String("aaa"), "false"}, // possessive: gives nothing back
		{`{"key": "p", "operator": "not_regex", "value": "a++a"}`, String("aaa"), "true"},
		{`{"key": "p", "operator": "regex", "value": "(?>a+)b"}`, String("aab"), "true"}, // atomic group
		{`{"key": "p", "operator": "not_regex", "value": "(?>a+)b"}`, String("aab"), "false"},
		{`{"key": "p", "operator": "regex", "value": "(?>x+){2}"}`, String("xx"), "false"},
		{`{"key": "p", "operator": "not_regex", "value": "(?>x+){2}"}`, String("xx"), "true"},
		{`{"key": "p", "operator": "regex", "value": "(a)?(?(1)b|c)"}`, String("c"), "true"}, // conditional
		{`{"key": "p", "operator": "not_regex", "value": "(a)?(?(1)b|c)"}`, String("c"), "false"},
		{`{"key": "p", "operator": "regex", "value": "abc$"}`, String("abc\n"), "true"}, // python's $ also matches before a final newline
		{`{"key": "p", "operator": "not_regex", "value": "abc$"}`, String("abc\n"), "false"},
		{`{"key": "p", "operator": "regex", "value": "abc\\Z"}`, String("abc\n"), "false"}, // \Z is the very end
		{`{"key": "p", "operator": "not_regex", "value": "abc\\Z"}`, String("abc\n"), "true"},
		{`{"key": "p", "operator": "regex", "value": "^a$"}`, String("a\nb"), "false"},
		{`{"key": "p", "operator": "not_regex", "value": "^a$"}`, String("a\nb"), "true"},
		{`{"key": "p", "operator": "regex", "value": "^\\d+$"}`, String("١٢٣"), "true"}, // \d is any decimal digit
		{`{"key": "p", "operator": "not_regex", "value": "^\\d+$"}`, String("١٢٣"), "false"},
		{`{"key": "p", "operator": "regex", "value": "(?a)^\\d+$"}`, String("١٢٣"), "false"}, // ASCII mode
		{`{"key": "p", "operator": "not_regex", "value": "(?a)^\\d+$"}`, String("١٢٣"), "true"},
		{`{"key": "p", "operator": "regex", "value": "^\\w+$"}`, String("é_9"), "true"},
		{`{"key": "p", "operator": "not_regex", "value": "^\\w+$"}`, String("é_9"), "false"},
		{`{"key": "p", "operator": "regex", "value": "\\s"}`, String("　"), "true"},
		{`{"key": "p", "operator": "not_regex", "value": "\\s"}`, String("　"), "false"},
		{`{"key": "p", "operator": "regex", "value": "\\s"}`, String("\u001c"), "true"}, // python's \s includes \x1c-\x1f
		{`{"key": "p", "operator": "not_regex", "value": "\\s"}`, String("\u001c"), "false"},
		{`{"key": "p", "operator": "regex", "value": "\\b\u00e9"}`, String("é"), "true"}, // python's \b is Unicode
		{`{"key": "p", "operator": "not_regex", "value": "\\b\u00e9"}`, String("é"), "false"},
		{`{"key": "p", "operator": "regex", "value": "a\\b"}`, String("aé"), "false"},
		{`{"key": "p", "operator": "not_regex", "value": "a\\b"}`, String("aé"), "true"},
		{`{"key": "p", "operator": "regex", "value": "\\B"}`, String(""), "false"}, // python's \B never matches the empty string
		{`{"key": "p", "operator": "not_regex", "value": "\\B"}`, String(""), "true"},
		{`{"key": "p", "operator": "regex", "value": "x{,2}y"}`, String("xxy"), "true"}, // {,n} is a repetition
		{`{"key": "p", "operator": "not_regex", "value": "x{,2}y"}`, String("xxy"), "false"},
		{`{"key": "p", "operator": "regex", "value": "(?x) a b  # comment"}`, String("ab"), "true"}, // verbose mode
		{`{"key": "p", "operator": "not_regex", "value": "(?x) a b  # comment"}`, String("ab"), "false"},
		{`{"key": "p", "operator": "regex", "value": "(?i)STRASSE"}`, String("strasse"), "true"},
		{`{"key": "p", "operator": "not_regex", "value": "(?i)STRASSE"}`, String("strasse"), "false"},
		{`{"key": "p", "operator": "regex", "value": "[\\d-z]"}`, String("-"), "false"}, // python rejects a range from a class
		{`{"key": "p", "operator": "not_regex", "value": "[\\d-z]"}`, String("-"), "false"},
		{`{"key": "p", "operator": "regex", "value": "\\pL"}`, String("a"), "false"}, // python has no \p
		{`{"key": "p", "operator": "not_regex", "value": "\\pL"}`, String("a"), "false"},
		{`{"key": "p", "operator": "regex", "value": "(?<n>x)"}`, String("x"), "false"}, // python 3.11 has no (?<name>
		{`{"key": "p", "operator": "not_regex", "value": "(?<n>x)"}`, String("x"), "false"},
		{`{"key": "p", "operator": "regex", "value": "a(?i)b"}`, String("ab"), "false"}, // global flags must come first
		{`{"key": "p", "operator": "not_regex", "value": "a(?i)b"}`, String("ab"), "false"},
		{`{"key": "p", "operator": "regex", "value": "\\z"}`, String(""), "false"}, // python has no \z
		{`{"key": "p", "operator": "not_regex", "value": "\\z"}`, String(""), "false"},
		{`{"key": "p", "operator": "regex", "value": "["}`, String("["), "false"},
		{`{"key": "p", "operator": "not_regex", "value": "["}`, String("["), "false"},
		{`{"key": "p", "operator": "regex", "value": "(?<=a+)b"}`, String("ab"), "false"}, // python needs a fixed-width look-behind
		{`{"key": "p", "operator": "not_regex", "value": "(?<=a+)b"}`, String("ab"), "false"},
		{`{"key": "p", "operator": "regex", "value": "a{4294967295}"}`, String("a"), "inconclusive"}, // python raises OverflowError: inconclusive
		{`{"key": "p", "operator": "not_regex", "value": "a{4294967295}"}`, String("a"), "inconclusive"},
		{`{"key": "p", "operator": "regex", "value": "(?a)(?u)x"}`, String("x"), "inconclusive"}, // python raises ValueError: inconclusive
		{`{"key": "p", "operator": "not_regex", "value": "(?a)(?u)x"}`, String("x"), "inconclusive"},
	})
}

func TestOrderedOperatorsCompareNumbersWhenBothAreNumbers(t *testing.T) {
	runOpCases(t, []opCase{
		{`{"key":"p","operator":"lt","value":30}`, String("100"), "false"},
		{`{"key":"p","operator":"gt","value":"10"}`, String("9"), "false"},
		{`{"key":"p","operator":"gt","value":3}`, String(" 5 "), "true"},
		{`{"key":"p","operator":"gte","value":2.5}`, Float(2.5), "true"},
		{`{"key":"p","operator":"lte","value":"1e3"}`, Int(1000), "true"},
		// Otherwise the strings are compared.
		{`{"key":"p","operator":"gt","value":"a"}`, String("b"), "true"},
		{`{"key":"p","operator":"lt","value":5}`, String("abc"), "false"},
		{`{"key":"p","operator":"gt","value":5}`, String("abc"), "true"},
		{`{"key":"p","operator":"gt","value":1}`, Null(), "false"},
	})
}

func TestDateOperators(t *testing.T) {
	// Now is 2022-03-31T12:00:00Z in runOpCases.
	runOpCases(t, []opCase{
		{`{"key":"p","operator":"is_date_before","value":"2022-05-01"}`, String("2022-04-30T23:59:59Z"), "true"},
		{`{"key":"p","operator":"is_date_after","value":"2022-05-01T00:00:00+02:00"}`, String("2022-04-30 22:00:01"), "true"},
		{`{"key":"p","operator":"is_date_before","value":"2022-05-01"}`, String("20220430"), "true"},
		{`{"key":"p","operator":"is_date_before","value":"2022-05-01"}`, String("2022-W17-6"), "true"}, // 30 April
		{`{"key":"p","operator":"is_date_after","value":"2022-05-01 UTC"}`, String("2022-05-01T00:00:00.000001Z"), "true"},
		{`{"key":"p","operator":"is_date_after","value":"2022-05-01T00:00 +01:00"}`, String("2022-04-30T23:00:01+00:00"), "true"},
		// Only what posthog-python's parse_datetime (fromisoformat) reads.
		{`{"key":"p","operator":"is_date_after","value":"May 1, 2022"}`, String("2022-05-02"), "inconclusive"},
		{`{"key":"p","operator":"is_date_before","value":"2022-05-01"}`, String("04/30/2022"), "inconclusive"},
		{`{"key":"p","operator":"is_date_before","value":"2022-05-01"}`, String("2022-04-30 11:00 PM"), "inconclusive"},
		{`{"key":"p","operator":"is_date_before","value":"2022-05-01"}`, String("2022-04"), "inconclusive"},
		{`{"key":"p","operator":"is_date_before","value":"2022-05-01"}`, String("2022-04-30T10:00z"), "inconclusive"},
		// A bare year takes today's month and day (31 March here).
		{`{"key":"p","operator":"is_date_before","value":"2022-04-01"}`, String("2022"), "true"},
		{`{"key":"p","operator":"is_date_after","value":"2022-03-30"}`, String("２０２２"), "true"},
		// One month before 31 March is 28 February (clamped), as dateutil does.
		{`{"key":"p","operator":"is_date_after","value":"-1m"}`, String("2022-02-28T12:00:01Z"), "true"},
		{`{"key":"p","operator":"is_date_after","value":"-1m"}`, String("2022-02-28T11:59:59Z"), "false"},
		{`{"key":"p","operator":"is_date_before","value":"1y"}`, String("2021-03-30"), "true"},
		// Unparseable values are inconclusive, not false.
		{`{"key":"p","operator":"is_date_before","value":"2022-05-01"}`, String("yesterday"), "inconclusive"},
		{`{"key":"p","operator":"is_date_before","value":"2022-05-01"}`, Int(1651363200), "inconclusive"},
		{`{"key":"p","operator":"is_date_before","value":"not a date"}`, String("2022-01-01"), "inconclusive"},
		{`{"key":"p","operator":"is_date_before","value":"2022-02-30"}`, String("2022-01-01"), "inconclusive"},
		{`{"key":"p","operator":"is_date_before","value":"10000d"}`, String("2022-01-01"), "inconclusive"},
		// python's $ also matches before a final newline; nothing else is trimmed.
		{`{"key":"p","operator":"is_date_after","value":"7d\n"}`, String("2022-03-25"), "true"},
		{`{"key":"p","operator":"is_date_after","value":" 7d"}`, String("2022-03-25"), "inconclusive"},
		// Beyond year 1 posthog-python gives up on a relative date.
		{`{"key":"p","operator":"is_date_after","value":"2022y"}`, String("2022-03-25"), "inconclusive"},
		{`{"key":"p","operator":"is_date_after","value":"2021y"}`, String("2022-03-25"), "true"},
	})
}

func TestSemverOperatorsBeyondTheVectors(t *testing.T) {
	runOpCases(t, []opCase{
		{`{"key":"p","operator":"semver_gt","value":"99999999999999999999.0.0"}`, String("100000000000000000000.0.0"), "true"},
		{`{"key":"p","operator":"semver_eq","value":"1.2"}`, String("1.2.0"), "true"},
		{`{"key":"p","operator":"semver_eq","value":"1.2.3"}`, String("1.2.3+build.9"), "true"},
		{`{"key":"p","operator":"semver_caret","value":"0.0.9"}`, String("0.0.10"), "false"},
		{`{"key":"p","operator":"semver_tilde","value":"1.9.0"}`, String("1.10.0"), "false"},
		{`{"key":"p","operator":"semver_wildcard","value":"1.2.3"}`, String("1.2.3"), "true"},
		{`{"key":"p","operator":"semver_wildcard","value":"1.2.3"}`, String("1.2.4"), "false"},
		{`{"key":"p","operator":"semver_wildcard","value":"*"}`, String("1.0.0"), "inconclusive"},
		// Empty components are dropped from a wildcard: "1.*.3" is 1.3.x.
		{`{"key":"p","operator":"semver_wildcard","value":"1.*.3"}`, String("1.0.3"), "false"},
		{`{"key":"p","operator":"semver_wildcard","value":"1.*.3"}`, String("1.3.9"), "true"},
		{`{"key":"p","operator":"semver_wildcard","value":"*.2"}`, String("2.5.0"), "true"},
		{`{"key":"p","operator":"semver_wildcard","value":"1.2-beta.*"}`, String("1.2.0"), "inconclusive"},
		// An empty minor or patch is 0 (ruling of 2026-12-02), on both sides.
		{`{"key":"p","operator":"semver_eq","value":"1.2.3"}`, String("1..3"), "false"},
		{`{"key":"p","operator":"semver_eq","value":"1.0.3"}`, String("1..3"), "true"},
		{`{"key":"p","operator":"semver_eq","value":"2."}`, String("2.0.0"), "true"},
		{`{"key":"p","operator":"semver_gt","value":"1..3"}`, String("1.0.4"), "true"},
		{`{"key":"p","operator":"semver_eq","value":"1.2.3"}`, String(".2.3"), "inconclusive"},
		// Digits are python's: other scripts' decimal digits count, with their
		// values; superscripts (isdigit but not int()-able) do not.
		{`{"key":"p","operator":"semver_eq","value":"1.2.3"}`, String("１.２.３"), "true"},
		{`{"key":"p","operator":"semver_eq","value":"1.2.3"}`, String("١.٢.٣"), "true"},
		{`{"key":"p","operator":"semver_eq","value":"1.0.0"}`, String("０1"), "true"},
		{`{"key":"p","operator":"semver_eq","value":"1.0.0"}`, String("01"), "inconclusive"},
		{`{"key":"p","operator":"semver_eq","value":"2.0.0"}`, String("²"), "inconclusive"},
		// Every leading v goes, and white space as python's str.strip sees it.
		{`{"key":"p","operator":"semver_eq","value":"vv1.2"}`, String("\u00a0\u001c1.2.0\u3000"), "true"},
		{`{"key":"p","operator":"semver_eq","value":"1.2.0"}`, String("v 1.2"), "inconclusive"},
		// python's int() refuses more than 4300 digits.
		{`{"key":"p","operator":"semver_gt","value":"1.0.0"}`, String(strings.Repeat("9", 4300)), "true"},
		{`{"key":"p","operator":"semver_gt","value":"1.0.0"}`, String(strings.Repeat("9", 4301)), "inconclusive"},
	})
}

func TestPreconditions(t *testing.T) {
	d := flagWithFilter(t, `{"key":"p","operator":"exact","value":"x"}`)
	if r := d.Evaluate("f", &Subject{DistinctID: "u"}); r.Reason != ReasonMissingProperty {
		t.Errorf("missing property: got %s", r.Reason)
	}
	for _, op := range []string{"is_date_exact", "between", "in", "flag_evaluates_to", "bogus"} {
		d := flagWithFilter(t, fmt.Sprintf(`{"key":"p","operator":%q,"value":"x"}`, op))
		r := d.Evaluate("f", &Subject{DistinctID: "u", Person: Properties{{Key: "p", Value: String("x")}}})
		if r.Reason != ReasonUnknownOperator {
			t.Errorf("operator %s: got %s, want unknown_operator", op, r.Reason)
		}
	}
	d = flagWithFilter(t, `{"key":"p","operator":"is_not_set"}`)
	if r := d.Evaluate("f", &Subject{DistinctID: "u", Person: Properties{{Key: "p", Value: String("x")}}}); r.Reason != ReasonIsNotSet {
		t.Errorf("is_not_set: got %s", r.Reason)
	}
	d = flagWithFilter(t, `{"key":"p","operator":"is_set"}`)
	if r := d.Evaluate("f", &Subject{DistinctID: "u", Person: Properties{{Key: "p", Value: String("")}}}); !r.Enabled {
		t.Errorf("is_set on an empty string: got %s", r.Reason)
	}
	// distinct_id is a person property even when the caller did not pass it;
	// the caller's value wins when it did.
	d = flagWithFilter(t, `{"key":"distinct_id","operator":"exact","value":"u-1"}`)
	if r := d.Evaluate("f", &Subject{DistinctID: "u-1"}); !r.Enabled {
		t.Errorf("distinct_id fallback: got %s (%s)", r.Value(), r.Reason)
	}
	if r := d.Evaluate("f", &Subject{DistinctID: "u-1", Person: Properties{{Key: "distinct_id", Value: String("other")}}}); r.Enabled {
		t.Error("the caller's distinct_id property must win")
	}
}

package eval_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/flagsplit/flagsplit/eval"
)

// Fuzz targets for parsing and evaluation. The seeds (conformance documents,
// hand-written malformed documents, operator and value combinations) and the
// corpus under testdata/fuzz run in every `go test`; to explore further:
//
//	go test -run '^$' -fuzz '^FuzzParse$' -fuzztime 3m -parallel 2 ./eval/
//	go test -run '^$' -fuzz '^FuzzEvaluate$' -fuzztime 3m -parallel 2 ./eval/
//
// Every input must parse and evaluate without panicking or hanging, and the
// answers must satisfy the invariants checked below.

// fuzzNow is the clock of every fuzzed subject, so relative dates are stable.
var fuzzNow = time.Date(2024, 6, 15, 12, 0, 0, 0, time.UTC)

// fuzzTimeLimit bounds the work on one input. Well-formed or not, a document of
// a few kilobytes evaluates in milliseconds; an input taking this long is
// reported as a hang. It stays below the 10 s after which the fuzzing engine
// kills a worker without saying why.
const fuzzTimeLimit = 8 * time.Second

// missingKey is a flag key the fuzzed documents are not expected to define.
const missingKey = "\x00fuzz-missing-flag"

// checker collects invariant violations found on one input.
type checker struct {
	errs    []string
	dropped int
}

// maxErrors bounds the violations reported per input; one root cause usually
// shows up in many places.
const maxErrors = 10

func (c *checker) errorf(format string, args ...any) {
	if len(c.errs) < maxErrors {
		c.errs = append(c.errs, fmt.Sprintf(format, args...))
	} else {
		c.dropped++
	}
}

// guarded runs check on its own goroutine so that a hang is reported (with every
// goroutine's stack) instead of stalling the fuzzer, and a panic is reported with
// its stack.
func guarded(t *testing.T, input string, check func(c *checker)) {
	t.Helper()
	type outcome struct {
		errs     []string
		dropped  int
		panicked any
		stack    []byte
	}
	done := make(chan outcome, 1)
	go func() {
		c := &checker{}
		defer func() {
			if p := recover(); p != nil {
				done <- outcome{errs: c.errs, dropped: c.dropped, panicked: p, stack: debug.Stack()}
			}
		}()
		check(c)
		done <- outcome{errs: c.errs, dropped: c.dropped}
	}()
	timer := time.NewTimer(fuzzTimeLimit)
	defer timer.Stop()
	select {
	case o := <-done:
		for _, e := range o.errs {
			t.Errorf("%s", e)
		}
		if o.dropped > 0 {
			t.Errorf("... and %d more violations", o.dropped)
		}
		if o.panicked != nil {
			t.Fatalf("panic: %v\n%s\ninput: %s", o.panicked, o.stack, input)
		}
		if len(o.errs) > 0 {
			t.Logf("input: %s", input)
		}
	case <-timer.C:
		buf := make([]byte, 64<<10)
		buf = buf[:runtime.Stack(buf, true)]
		t.Fatalf("no answer within %v (hang)\ninput: %s\n%s", fuzzTimeLimit, input, buf)
	}
}

func quoteInput(s string) string {
	const maxLen = 512
	if len(s) > maxLen {
		return strconv.Quote(s[:maxLen]) + fmt.Sprintf(" ... (%d bytes)", len(s))
	}
	return strconv.Quote(s)
}

// ---------------------------------------------------------------------------
// FuzzParse

func FuzzParse(f *testing.F) {
	for _, doc := range conformanceDocuments(f) {
		f.Add(doc)
	}
	for _, doc := range malformedDocuments() {
		f.Add([]byte(doc))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		guarded(t, quoteInput(string(data)), func(c *checker) { checkDocument(c, data) })
	})
}

// conformanceDocuments returns the "flags" document of every conformance suite
// (hash.json holds hash vectors, not suites, and is skipped).
func conformanceDocuments(f *testing.F) [][]byte {
	files, err := filepath.Glob(filepath.Join("testdata", "conformance", "*.json"))
	if err != nil {
		f.Fatal(err)
	}
	if len(files) == 0 {
		f.Fatal("no conformance files")
	}
	sort.Strings(files)
	var docs [][]byte
	for _, file := range files {
		if filepath.Base(file) == "hash.json" {
			continue
		}
		data, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		var suites []struct {
			Flags json.RawMessage `json:"flags"`
		}
		if err := json.Unmarshal(data, &suites); err != nil {
			f.Fatalf("%s: %v", file, err)
		}
		for _, s := range suites {
			docs = append(docs, append([]byte(nil), s.Flags...))
		}
	}
	return docs
}

func malformedDocuments() []string {
	nested := func(depth int, leaf string) string {
		return strings.Repeat(`{"type":"AND","values":[`, depth) + leaf + strings.Repeat(`]}`, depth)
	}
	deepList := strings.Repeat("[", 200) + strings.Repeat("]", 200)
	docs := []string{
		// Not documents, or truncated ones.
		``,
		`null`,
		`[]`,
		`"flags"`,
		`{}`,
		`{"flags": null}`,
		`{"flags": {}}`,
		`{"flags": "a"}`,
		`{"flags": [null, 1, "x", [], {}]}`,
		`{"flags": [{"key": "a", "active": true, "filters": {"groups": [{"rollout_percentage": 5`,
		`{"flags": [{"key": "a", "active": true, "filters": {"groups": [{"properties": [{"key": "p", "value": "x"}]}]}}]`,
		`{"flags": [{"key": "a"}]} trailing`,
		// Wrong types in every field.
		`{"flags": [{"id": "1", "key": 7, "active": "yes"}, {"key": "b", "id": 1.5, "name": 3, "version": "2", "active": 1,
			"ensure_experience_continuity": "no", "has_experiment": "no", "has_encrypted_payloads": 0, "bucketing_identifier": 5}]}`,
		`{"flags": [{"key": "a", "active": true, "filters": {"groups": [{"rollout_percentage": "50"}]}}]}`,
		`{"flags": [{"key": "a", "active": true, "filters": {"groups": {"0": {"rollout_percentage": 50}}}}]}`,
		`{"flags": [{"key": "a", "active": true, "filters": {"groups": [{"properties": "email = x", "rollout_percentage": 100}]}}]}`,
		`{"flags": [{"key": "a", "active": true, "filters": {"groups": [{"properties": [{"key": 1, "operator": 2, "type": 3, "negation": "no"}]}]}}]}`,
		`{"flags": [{"key": "a", "active": true, "filters": "none"}, {"key": "b", "active": true, "filters": []}]}`,
		`{"flags": [{"key": "a", "active": true, "filters": {"groups": [null, 1, {"variant": 3}]}}]}`,
		`{"flags": [{"key": "a", "active": true, "filters": {"groups": [{"rollout_percentage": 100}],
			"multivariate": {"variants": [{"key": "x", "rollout_percentage": "fifty"}, {"key": "y", "rollout_percentage": 50}]}}}]}`,
		`{"flags": [{"key": "a", "active": true, "filters": {"groups": [{"rollout_percentage": 100}],
			"multivariate": {"variants": [{"key": "x", "rollout_percentage": -50}, {"key": "y", "rollout_percentage": 250}, {"key": "x", "rollout_percentage": 10}]}}}]}`,
		`{"flags": [{"key": "a", "active": true, "filters": {"groups": [{"rollout_percentage": 100, "variant": "zz"}],
			"multivariate": {"variants": [{"key": "", "rollout_percentage": 50}, {"rollout_percentage": 50}]}}}]}`,
		`{"flags": [{"key": "a", "active": true, "filters": {"groups": [{"rollout_percentage": 100}], "multivariate": {"variants": {"key": "x"}}}},
			{"key": "b", "active": true, "filters": {"groups": [{"rollout_percentage": 100}], "multivariate": []}}]}`,
		`{"flags": [{"key": "a", "active": true, "filters": {"groups": [{"rollout_percentage": 100}],
			"multivariate": {"variants": [{"key": "x", "rollout_percentage": 100}]},
			"payloads": {"x": "{\"a\": 1}", "true": "not json", "false": [1, 2], "y": null}}},
			{"key": "b", "active": true, "filters": {"groups": [{"rollout_percentage": 100}], "payloads": ["x"]}},
			{"key": "c", "active": true, "has_encrypted_payloads": true, "filters": {"groups": [{"rollout_percentage": 100}], "payloads": {"true": "secret"}}}]}`,
		// Huge numbers.
		`{"flags": [{"id": 1e400, "version": 99999999999999999999, "key": "a", "active": true,
			"filters": {"aggregation_group_type_index": 1e400, "groups": [{"rollout_percentage": 1e400}]}},
			{"key": "b", "active": true, "filters": {"groups": [{"rollout_percentage": 1e300, "properties": [{"key": "n", "operator": "gt", "value": 1e400}]}],
			"multivariate": {"variants": [{"key": "x", "rollout_percentage": 1e308}, {"key": "y", "rollout_percentage": -1e308}]}}},
			{"key": "c", "active": true, "filters": {"aggregation_group_type_index": 99999999999999999999, "groups": [{"rollout_percentage": -0.0}]}}]}`,
		// Unicode and odd keys.
		`{"flags": [{"key": "ключ-İΣß", "active": true, "filters": {"groups": [{"properties": [{"key": "Straße", "operator": "exact", "value": "İSTANBUL"}], "rollout_percentage": 100}]}},
			{"key": "\u0000", "active": true, "filters": {"groups": [{"rollout_percentage": 50}]}},
			{"key": "🚩\ud800", "active": true, "filters": {"groups": [{"properties": [{"key": "ΟΔΟΣ", "operator": "icontains", "value": "σ"}]}]}},
			{"key": "dup", "active": true}, {"key": "dup", "active": false}, {"key": "", "active": true}, {"key": "gone", "deleted": true}]}`,
		// Group flags and mixed targeting.
		`{"flags": [{"key": "g", "active": true, "filters": {"aggregation_group_type_index": 0, "groups": [{"properties": [{"key": "$group_key", "value": "key-company"}]}, {"rollout_percentage": 30}]}},
			{"key": "g2", "active": true, "filters": {"aggregation_group_type_index": 7, "groups": [{"rollout_percentage": 100}]}},
			{"key": "mixed", "active": true, "filters": {"groups": [{"aggregation_group_type_index": 1, "properties": [{"key": "tier", "value": "gold"}]}, {"aggregation_group_type_index": 9, "rollout_percentage": 100}, {"rollout_percentage": 10}]}}],
			"group_type_mapping": {"0": "company", "1": "project", "2": 5, "x": "İ"}}`,
		`{"flags": [{"key": "g", "active": true, "filters": {"aggregation_group_type_index": 0}}], "group_type_mapping": ["company"]}`,
		// Device bucketing, experience continuity, inactive flags.
		`{"flags": [{"key": "d", "active": true, "bucketing_identifier": "device_id", "filters": {"groups": [{"rollout_percentage": 50}]}},
			{"key": "d2", "active": true, "filters": {"bucketing_identifier": "device_id", "early_exit": true, "groups": [{"rollout_percentage": 1}, {"rollout_percentage": 100}]}},
			{"key": "ec", "active": true, "ensure_experience_continuity": true, "filters": {"groups": [{"rollout_percentage": 100}]}},
			{"key": "off", "active": false, "filters": {"groups": [{"rollout_percentage": 100}]}}]}`,
		// Cohorts that refer to each other in a cycle, static and malformed cohorts.
		`{"flags": [{"key": "c", "active": true, "filters": {"groups": [{"properties": [{"key": "id", "type": "cohort", "value": 1}]}]}},
			{"key": "c2", "active": true, "filters": {"groups": [{"properties": [{"key": "id", "type": "cohort", "value": "2", "operator": "not_in"}]}]}},
			{"key": "c3", "active": true, "filters": {"groups": [{"properties": [{"key": "id", "type": "cohort", "value": 404}]}, {"rollout_percentage": 100}]}},
			{"key": "c4", "active": true, "filters": {"groups": [{"properties": [{"key": "id", "type": "cohort", "value": 3, "operator": "gt"}]}, {"rollout_percentage": 100}]}}],
			"cohorts": {"1": {"type": "OR", "values": [{"key": "id", "type": "cohort", "value": 2}, {"key": "plan", "value": "pro"}]},
				"2": {"type": "AND", "values": [{"key": "id", "type": "cohort", "value": 1}]},
				"3": {"type": "OR", "values": [{"type": "AND", "values": [{"key": "email", "operator": "icontains", "value": "example", "negation": true}]}, {}]},
				"4": "bad", "5": {"type": "XOR", "values": []}}}`,
		`{"flags": [{"key": "self", "active": true, "filters": {"groups": [{"properties": [{"key": "id", "type": "cohort", "value": 7}]}]}}],
			"cohorts": {"7": {"type": "AND", "values": [{"key": "id", "type": "cohort", "value": 7}]}}}`,
		`{"flags": [], "cohorts": []}`,
		// Deeply nested cohort groups (beyond the nesting bound) and deeply nested values.
		`{"flags": [{"key": "deep", "active": true, "filters": {"groups": [{"properties": [{"key": "id", "type": "cohort", "value": 1}]}]}},
			{"key": "ok", "active": true, "filters": {"groups": [{"properties": [{"key": "id", "type": "cohort", "value": 2}]}]}}],
			"cohorts": {"1": ` + nested(40, `{"key": "plan", "value": "pro"}`) + `, "2": ` + nested(10, `{"key": "plan", "operator": "is_set"}`) + `}}`,
		`{"flags": [{"key": "v", "active": true, "filters": {"groups": [{"properties": [{"key": "p", "operator": "exact", "value": ` + deepList + `}]}]}}]}`,
		// Flag dependencies: a cycle with non-empty chains, a cycle the server marked
		// with an empty chain, missing flags and malformed dependencies.
		`{"flags": [{"key": "A", "active": true, "filters": {"groups": [{"properties": [{"key": "B", "type": "flag", "operator": "flag_evaluates_to", "value": true, "dependency_chain": ["B"]}], "rollout_percentage": 100}]}},
			{"key": "B", "active": true, "filters": {"groups": [{"properties": [{"key": "A", "type": "flag", "operator": "flag_evaluates_to", "value": true, "dependency_chain": ["A"]}], "rollout_percentage": 100}]}}]}`,
		`{"flags": [{"key": "A", "active": true, "filters": {"groups": [{"properties": [{"key": "B", "type": "flag", "operator": "flag_evaluates_to", "value": true, "dependency_chain": ["A", "B"]}]}]}},
			{"key": "B", "active": true, "filters": {"groups": [{"properties": [{"key": "A", "type": "flag", "operator": "flag_evaluates_to", "value": false, "dependency_chain": []}]}]}},
			{"key": "C", "active": true, "filters": {"groups": [{"properties": [{"key": "Z", "type": "flag", "operator": "flag_evaluates_to", "value": "v", "dependency_chain": ["Z"]}]}, {"rollout_percentage": 100}]}},
			{"key": "D", "active": true, "filters": {"groups": [{"properties": [{"key": "A", "type": "flag", "operator": "exact", "value": 1}, {"key": "A", "type": "flag", "operator": "flag_evaluates_to", "value": true}]}]}},
			{"key": "E", "active": true, "filters": {"groups": [{"properties": [{"key": "F", "type": "flag", "operator": "flag_evaluates_to", "value": "x", "dependency_chain": "F"}]}]}},
			{"key": "F", "active": true, "filters": {"multivariate": {"variants": [{"key": "x", "rollout_percentage": 100}]}, "groups": [{"rollout_percentage": 100}]}}]}`,
		// Every operator once, with awkward values.
		`{"flags": [{"key": "ops", "active": true, "filters": {"groups": [
			{"properties": [{"key": "email", "operator": "regex", "value": "(a+)+$"}, {"key": "email", "operator": "not_regex", "value": "(?=x)"}]},
			{"properties": [{"key": "signup", "operator": "is_date_before", "value": "-6h"}, {"key": "signup", "operator": "is_date_after", "value": "99999y"}]},
			{"properties": [{"key": "signup", "operator": "is_date_after", "value": "May 1, 2022"}, {"key": "signup", "operator": "is_date_before", "value": "2022-05-01T10:00:00+01:00"}]},
			{"properties": [{"key": "version", "operator": "semver_tilde", "value": "v1.2.3-beta"}, {"key": "version", "operator": "semver_wildcard", "value": "1.*"}]},
			{"properties": [{"key": "version", "operator": "semver_caret", "value": "01.2"}, {"key": "version", "operator": "semver_gt", "value": "99999999999999999999999.1.1"}]},
			{"properties": [{"key": "age", "operator": "gte", "value": "30"}, {"key": "age", "operator": "lt", "value": 1e400}]},
			{"properties": [{"key": "plan", "operator": "in", "value": ["pro"]}, {"key": "plan", "operator": "is_not_set"}]},
			{"properties": [{"key": "plan", "operator": "between", "value": [1, 2]}]},
			{"properties": [{"key": "beta", "operator": "exact", "value": ["true", "TRUE"]}, {"key": "beta", "operator": "is_not", "value": null}]},
			{"properties": [{"key": "distinct_id", "operator": "starts_with", "value": "USER"}, {"key": "$browser", "operator": "not_ends_with", "value": "ß"}]}
		]}}]}`,
	}
	return docs
}

// checkDocument parses data and, when it parses, evaluates every flag for a few
// subjects and checks the answers.
func checkDocument(c *checker, data []byte) {
	defs, err := eval.Parse(data)
	if err != nil {
		if defs != nil {
			c.errorf("Parse returned definitions and the error %v", err)
		}
		return
	}
	if defs == nil {
		c.errorf("Parse returned neither definitions nor an error")
		return
	}
	checkShape(c, defs)
	subjects := documentSubjects(defs, data)
	for _, s := range subjects {
		checkSubject(c, defs, s)
	}
	checkOverrides(c, defs, subjects[len(subjects)-1])
	checkConcurrent(c, defs, subjects[len(subjects)-1])
}

// checkShape checks what Parse reports about the flags themselves.
func checkShape(c *checker, defs *eval.Definitions) {
	for _, p := range defs.Problems() {
		_ = p.String()
	}
	for _, p := range defs.Warnings() {
		_ = p.String()
	}
	flags := defs.Flags()
	if defs.Len() != len(flags) {
		c.errorf("Len() = %d, Flags() has %d", defs.Len(), len(flags))
	}
	seen := map[string]bool{}
	for i, fl := range flags {
		if fl == nil {
			c.errorf("Flags()[%d] is nil", i)
			return
		}
		if seen[fl.Key] {
			c.errorf("flag key %q appears twice in Flags()", fl.Key)
		}
		seen[fl.Key] = true
		if got, ok := defs.Flag(fl.Key); !ok || got != fl {
			c.errorf("Flag(%q) does not return Flags()[%d]", fl.Key, i)
		}
		if fl.Index() != i {
			c.errorf("flag %q: Index() = %d, want %d", fl.Key, fl.Index(), i)
		}
		for _, v := range fl.Variants() {
			if !fl.HasVariant(v) {
				c.errorf("flag %q: HasVariant(%q) is false for one of its Variants()", fl.Key, v)
			}
		}
		if fl.Override() != nil {
			c.errorf("flag %q: freshly parsed flag has an override", fl.Key)
		}
	}
}

// documentSubjects returns the subjects a document is evaluated for: one with
// only a distinct id, one with a device id, common properties and a group of
// every type in group_type_mapping, and one whose properties are taken from the
// document's own property filters (so that conditions match and the deeper
// paths are reached). The richest subject is last.
func documentSubjects(defs *eval.Definitions, data []byte) []*eval.Subject {
	derived := filterProperties(data)
	common := eval.Properties{
		{Key: "email", Value: eval.String("user@example.com")},
		{Key: "plan", Value: eval.String("pro")},
		{Key: "version", Value: eval.String("1.2.3")},
		{Key: "signup", Value: eval.String("2024-06-15T08:00:00Z")},
		{Key: "age", Value: eval.Int(30)},
		{Key: "score", Value: eval.Float(2.5)},
		{Key: "beta", Value: eval.Bool(true)},
		{Key: "nothing", Value: eval.Null()},
		{Key: "$browser", Value: eval.String("Chrome")},
	}
	var types []string
	for _, name := range defs.GroupTypes() {
		types = append(types, name)
	}
	sort.Strings(types)
	var groups []eval.Group
	for i, name := range types {
		props := common
		if i%2 == 0 {
			props = derived
		}
		groups = append(groups, eval.Group{Type: name, Key: "key-" + name, Properties: props})
	}
	return []*eval.Subject{
		{DistinctID: "user-1", Now: fuzzNow},
		{DistinctID: "user-2", DeviceID: "device-2", Person: common, Groups: groups, Now: fuzzNow},
		{DistinctID: "user-3", DeviceID: "device-3", Person: append(append(eval.Properties(nil), derived...), common...), Groups: groups, Now: fuzzNow},
	}
}

// filterProperties collects {"key": k, "value": v} pairs from anywhere in the
// document as properties k = v (the first element for a list value).
func filterProperties(data []byte) eval.Properties {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var doc any
	if dec.Decode(&doc) != nil {
		return nil
	}
	var props eval.Properties
	seen := map[string]bool{}
	var walk func(x any, depth int)
	walk = func(x any, depth int) {
		if depth > 50 || len(props) >= 64 {
			return
		}
		switch x := x.(type) {
		case map[string]any:
			if key, ok := x["key"].(string); ok && !seen[key] {
				if raw, ok := x["value"]; ok {
					if list, ok := raw.([]any); ok && len(list) > 0 {
						raw = list[0]
					}
					if v, err := eval.FromJSON(raw); err == nil {
						seen[key] = true
						props = append(props, eval.Property{Key: key, Value: v})
					}
				}
			}
			keys := make([]string, 0, len(x))
			for k := range x {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				walk(x[k], depth+1)
			}
		case []any:
			for _, el := range x {
				walk(el, depth+1)
			}
		}
	}
	walk(doc, 0)
	return props
}

// loc says where a result came from; it is formatted only when a check fails.
type loc struct {
	subject string // distinct id
	label   string // how the result was obtained
	key     string
	index   int // position in a result set, -1 for none
	// marshal: also check the result's JSON (done once per result, not for
	// every copy of it).
	marshal bool
}

func (l loc) String() string {
	if l.index >= 0 {
		return fmt.Sprintf("subject %s: %s[%d] (flag %s)", shortQuote(l.subject), l.label, l.index, shortQuote(l.key))
	}
	return fmt.Sprintf("subject %s: %s(%s)", shortQuote(l.subject), l.label, shortQuote(l.key))
}

func shortQuote(s string) string {
	if len(s) > 40 {
		return strconv.Quote(s[:40]) + "..."
	}
	return strconv.Quote(s)
}

func describe(r eval.Result) string {
	payload := "<nil>"
	if r.Payload != nil {
		payload = string(r.Payload.Raw)
	}
	return fmt.Sprintf("{key %q enabled %v variant %q value %q reason %s condition %d payload %s}",
		r.Key, r.Enabled, r.Variant, r.Value(), r.Reason, r.Condition, payload)
}

// sameResult compares two answers for the same flag and subject. A regex
// match that ran out of time (regex_timeout) stands for any answer: whether a
// backtracking match finishes within RegexMatchTimeout depends on the
// machine's load, not on the input alone.
func sameResult(a, b eval.Result) bool {
	if a.Key == b.Key && (a.Reason == eval.ReasonRegexTimeout || b.Reason == eval.ReasonRegexTimeout) {
		return true
	}
	if a.Key != b.Key || a.Enabled != b.Enabled || a.Variant != b.Variant || a.Reason != b.Reason || a.Condition != b.Condition {
		return false
	}
	if (a.Payload == nil) != (b.Payload == nil) {
		return false
	}
	return a.Payload == nil || (bytes.Equal(a.Payload.Raw, b.Payload.Raw) && bytes.Equal(a.Payload.JSON, b.Payload.JSON))
}

var knownReasons = func() map[eval.Reason]bool {
	m := map[eval.Reason]bool{}
	for _, r := range eval.Reasons() {
		m[r] = true
	}
	return m
}()

// checkResult checks one answer on its own.
func checkResult(c *checker, defs *eval.Definitions, key string, r eval.Result, where loc) {
	if r.Key != key {
		c.errorf("%s: result key %q, want %q", where, r.Key, key)
	}
	if !knownReasons[r.Reason] {
		c.errorf("%s: %s has a reason outside Reasons()", where, describe(r))
	}
	if r.Inconclusive() != r.Reason.Inconclusive() {
		c.errorf("%s: Inconclusive() disagrees with Reason.Inconclusive() for %s", where, describe(r))
	}
	if r.Inconclusive() && (r.Enabled || r.Variant != "") {
		c.errorf("%s: inconclusive result is not plain false: %s", where, describe(r))
	}
	if r.Variant != "" && !r.Enabled {
		c.errorf("%s: result has a variant but is not enabled: %s", where, describe(r))
	}
	switch r.Reason {
	case eval.ReasonConditionMatch:
		if !r.Enabled || r.Condition < 0 {
			c.errorf("%s: a matched condition must enable the flag and name the condition: %s", where, describe(r))
		}
	case eval.ReasonNoConditionMatch, eval.ReasonOutOfRollout, eval.ReasonDisabled, eval.ReasonNoGroup, eval.ReasonKilled:
		if r.Enabled {
			c.errorf("%s: reason %s with an enabled flag: %s", where, r.Reason, describe(r))
		}
	}
	fl, ok := defs.Flag(key)
	value := r.Value()
	if !ok {
		if r.Reason != eval.ReasonUnknownFlag || value != "false" {
			c.errorf("%s: undefined flag answered %s", where, describe(r))
		}
	} else if value != "true" && value != "false" && !fl.HasVariant(value) {
		c.errorf("%s: value %q is neither true, false nor one of the variants %q: %s", where, value, fl.Variants(), describe(r))
	}
	if ok && r.Variant != "" && !fl.HasVariant(r.Variant) {
		c.errorf("%s: variant %q is not one of %q", where, r.Variant, fl.Variants())
	}
	if r.Payload != nil && (!json.Valid(r.Payload.Raw) || !json.Valid(r.Payload.JSON)) {
		c.errorf("%s: payload is not valid JSON: raw %q json %q", where, r.Payload.Raw, r.Payload.JSON)
	}
	if !where.marshal {
		return
	}
	out, err := json.Marshal(r)
	if err != nil {
		c.errorf("%s: MarshalJSON: %v (%s)", where, err, describe(r))
	} else if !json.Valid(out) {
		c.errorf("%s: MarshalJSON wrote invalid JSON %q", where, out)
	}
}

// checkSubject evaluates every flag of defs for s in every way the package
// offers and checks that the answers are sound and agree.
func checkSubject(c *checker, defs *eval.Definitions, s *eval.Subject) map[string]eval.Result {
	flags := defs.Flags()
	keys := make([]string, len(flags))
	direct := make(map[string]eval.Result, len(flags))
	for i, fl := range flags {
		keys[i] = fl.Key
		where := loc{subject: s.DistinctID, label: "Evaluate", key: fl.Key, index: -1, marshal: true}
		r := defs.Evaluate(fl.Key, s)
		checkResult(c, defs, fl.Key, r, where)
		if again := defs.Evaluate(fl.Key, s); !sameResult(r, again) {
			c.errorf("%s is not deterministic: %s, then %s", where, describe(r), describe(again))
		}
		if byFlag := defs.EvaluateFlag(fl, s); !sameResult(r, byFlag) {
			c.errorf("%s = %s but EvaluateFlag = %s", where, describe(r), describe(byFlag))
		}
		direct[fl.Key] = r
	}
	if _, defined := defs.Flag(missingKey); !defined {
		r := defs.Evaluate(missingKey, s)
		checkResult(c, defs, missingKey, r, loc{subject: s.DistinctID, label: "Evaluate", key: missingKey, index: -1, marshal: true})
	}

	all := defs.EvaluateAll(s, nil)
	if len(all) != len(flags) {
		c.errorf("subject %s: EvaluateAll gave %d results for %d flags", shortQuote(s.DistinctID), len(all), len(flags))
	} else {
		for i, r := range all {
			if want := direct[keys[i]]; !sameResult(r, want) {
				c.errorf("subject %s: EvaluateAll[%d] = %s, Evaluate = %s", shortQuote(s.DistinctID), i, describe(r), describe(want))
			}
		}
	}

	// The set of every flag, in document order, twice into the same Results.
	set := defs.FlagSet(nil)
	var res eval.Results
	set.Evaluate(s, &res)
	checkResults(c, defs, s, "FlagSet(nil)", set, &res, keys, direct)
	set.Evaluate(s, &res)
	checkResults(c, defs, s, "FlagSet(nil), second evaluation", set, &res, keys, direct)

	// The same flags in reverse order, with an undefined key among them.
	rev := make([]string, 0, len(keys)+1)
	for i := len(keys) - 1; i >= 0; i-- {
		rev = append(rev, keys[i])
		if i == len(keys)/2 {
			rev = append(rev, missingKey)
		}
	}
	if len(keys) == 0 {
		rev = append(rev, missingKey)
	}
	revSet := defs.FlagSet(rev)
	var revRes eval.Results
	revSet.Evaluate(s, &revRes)
	checkResults(c, defs, s, "FlagSet(reversed)", revSet, &revRes, rev, direct)

	// A cache answers the same on a miss and on the following hit.
	cache := allCache(8)
	miss := cacheEvaluate(cache, set, s)
	checkResults(c, defs, s, "Cache miss", set, &miss, keys, direct)
	hit := cacheEvaluate(cache, set, s)
	checkResults(c, defs, s, "Cache hit", set, &hit, keys, direct)
	if hits, misses, entries := cache.Stats(); hits != 1 || misses != 1 || entries != 1 {
		c.errorf("subject %s: cache stats after a miss and a hit: hits %d misses %d entries %d", shortQuote(s.DistinctID), hits, misses, entries)
	}
	// The same subject thirteen months later is a cache hit too; answers that
	// depend on the clock must follow it.
	later := *s
	later.Now = s.Now.AddDate(1, 1, 0)
	laterDirect := evaluateAll(defs, &later)
	laterHit := cacheEvaluate(cache, set, &later)
	checkResults(c, defs, &later, "Cache hit thirteen months later", set, &laterHit, keys, laterDirect)
	// Without a cache (size 0) the answers are computed directly.
	none := cacheEvaluate(eval.NewCache(0), set, s)
	checkResults(c, defs, s, "NewCache(0)", set, &none, keys, direct)
	return direct
}

// checkResults checks that res, the results of set for s, agree with direct
// evaluation.
func checkResults(c *checker, defs *eval.Definitions, s *eval.Subject, label string, set *eval.FlagSet,
	res *eval.Results, keys []string, direct map[string]eval.Result) {
	if res.Set() != set {
		c.errorf("subject %s: %s: Results.Set() is not the evaluated set", shortQuote(s.DistinctID), label)
	}
	if res.Len() != len(keys) || set.Len() != len(keys) {
		c.errorf("subject %s: %s: %d results, set of %d, for %d keys", shortQuote(s.DistinctID), label, res.Len(), set.Len(), len(keys))
		return
	}
	firstIndex := map[string]int{}
	for i, k := range keys {
		if _, ok := firstIndex[k]; !ok {
			firstIndex[k] = i
		}
	}
	for i, k := range keys {
		where := loc{subject: s.DistinctID, label: label, key: k, index: i}
		if res.Key(i) != k {
			c.errorf("%s: key %q, want %q", where, res.Key(i), k)
			continue
		}
		r := res.At(i)
		checkResult(c, defs, k, r, where)
		if want, ok := direct[k]; ok && !sameResult(r, want) {
			c.errorf("%s = %s, but Evaluate(%q) = %s", where, describe(r), k, describe(want))
		}
		if v := res.Value(i); v != r.Value() {
			c.errorf("%s: Results.Value = %q but Results.At(...).Value() = %q (%s)", where, v, r.Value(), describe(r))
		}
		if res.Reason(i) != r.Reason {
			c.errorf("%s: Results.Reason = %s but At(...).Reason = %s", where, res.Reason(i), r.Reason)
		}
		if got := res.Index(k); got != firstIndex[k] {
			c.errorf("%s: Index(%q) = %d, want %d", where, k, got, firstIndex[k])
		}
	}
}

func percent(p float64) *float64 { return &p }

// evaluateAll evaluates every flag directly, by key.
func evaluateAll(defs *eval.Definitions, s *eval.Subject) map[string]eval.Result {
	out := make(map[string]eval.Result, defs.Len())
	for _, fl := range defs.Flags() {
		out[fl.Key] = defs.Evaluate(fl.Key, s)
	}
	return out
}

// checkOverrides checks runtime overrides against their documented effect, and
// that applying them leaves the original definitions alone.
func checkOverrides(c *checker, defs *eval.Definitions, s *eval.Subject) {
	flags := defs.Flags()
	if len(flags) == 0 {
		return
	}
	before := defs.EvaluateAll(s, nil)

	full := map[string]eval.Override{}
	killed := map[string]eval.Override{}
	zero := map[string]eval.Override{}
	forced := map[string]eval.Override{}
	for i, fl := range flags {
		full[fl.Key] = eval.Override{RolloutPercentage: percent(100)}
		killed[fl.Key] = eval.Override{Killed: true}
		zero[fl.Key] = eval.Override{RolloutPercentage: percent(0)}
		if vs := fl.Variants(); len(vs) > 0 {
			if v := vs[len(vs)-1]; v != "" {
				forced[fl.Key] = eval.Override{Variant: v}
			}
		} else if i%2 == 0 {
			forced[fl.Key] = eval.Override{Variant: "true"}
		} else {
			forced[fl.Key] = eval.Override{Variant: "false"}
		}
	}

	// A 100 % rollout cap changes nothing.
	fullDefs := defs.WithOverrides(full)
	for i, fl := range flags {
		if got := fullDefs.Evaluate(fl.Key, s); !sameResult(got, before[i]) {
			c.errorf("override rollout_percentage 100 changed %q: %s, without it %s", fl.Key, describe(got), describe(before[i]))
		}
		if f2, ok := fullDefs.Flag(fl.Key); !ok || f2.Override() == nil {
			c.errorf("override of %q is not visible through Flag().Override()", fl.Key)
		}
	}
	// A kill switch forces false.
	killedDefs := defs.WithOverrides(killed)
	for _, fl := range flags {
		got := killedDefs.Evaluate(fl.Key, s)
		checkResult(c, killedDefs, fl.Key, got, loc{subject: s.DistinctID, label: "killed override", key: fl.Key, index: -1})
		if got.Enabled || got.Reason != eval.ReasonKilled {
			c.errorf("killed flag %q answered %s", fl.Key, describe(got))
		}
	}
	// A 0 % rollout cap lets nobody in.
	zeroDefs := defs.WithOverrides(zero)
	for _, fl := range flags {
		got := zeroDefs.Evaluate(fl.Key, s)
		checkResult(c, zeroDefs, fl.Key, got, loc{subject: s.DistinctID, label: "rollout 0 override", key: fl.Key, index: -1})
		if got.Enabled {
			c.errorf("flag %q with rollout_percentage 0 override answered %s", fl.Key, describe(got))
		}
	}
	// A forced variant (or true/false for a boolean flag) is the answer.
	forcedDefs := defs.WithOverrides(forced)
	for _, fl := range flags {
		o, ok := forced[fl.Key]
		if !ok {
			continue
		}
		got := forcedDefs.Evaluate(fl.Key, s)
		checkResult(c, forcedDefs, fl.Key, got, loc{subject: s.DistinctID, label: "variant override", key: fl.Key, index: -1})
		switch {
		case len(fl.Variants()) > 0:
			if !got.Enabled || got.Variant != o.Variant || got.Reason != eval.ReasonOverride {
				c.errorf("flag %q forced to variant %q answered %s", fl.Key, o.Variant, describe(got))
			}
		default:
			if got.Enabled != (o.Variant == "true") || got.Variant != "" || got.Reason != eval.ReasonOverride {
				c.errorf("boolean flag %q forced to %s answered %s", fl.Key, o.Variant, describe(got))
			}
		}
	}
	// The original definitions are untouched.
	for i, fl := range flags {
		if got := defs.Evaluate(fl.Key, s); !sameResult(got, before[i]) {
			c.errorf("WithOverrides changed the original definitions: %q now %s, before %s", fl.Key, describe(got), describe(before[i]))
		}
		if fl.Override() != nil {
			c.errorf("WithOverrides set an override on the original flag %q", fl.Key)
		}
	}

	// Swapping definitions in a Store makes the cache answer for the new ones.
	store := eval.NewStore()
	sel := eval.NewSelection(nil)
	cache := allCache(4)
	store.Swap(defs)
	first := cacheEvaluate(cache, sel.For(store.Load()), s)
	for i := range flags {
		if got := first.At(i); !sameResult(got, before[i]) {
			c.errorf("stored definitions: %s, direct %s", describe(got), describe(before[i]))
		}
	}
	store.Swap(killedDefs)
	second := cacheEvaluate(cache, sel.For(store.Load()), s)
	for i := 0; i < second.Len(); i++ {
		if got := second.At(i); got.Enabled || got.Reason != eval.ReasonKilled {
			c.errorf("after swapping in killed overrides the cache answered %s", describe(got))
		}
	}
}

// checkConcurrent evaluates from two goroutines at once through a shared set and
// cache (run under -race to find data races).
func checkConcurrent(c *checker, defs *eval.Definitions, s *eval.Subject) {
	set := defs.FlagSet(nil)
	cache := allCache(4)
	want := defs.EvaluateAll(s, nil)
	var wg sync.WaitGroup
	var mu sync.Mutex
	for g := 0; g < 2; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for round := 0; round < 2; round++ {
				res := cacheEvaluate(cache, set, s)
				for i := 0; i < res.Len() && i < len(want); i++ {
					if got := res.At(i); !sameResult(got, want[i]) {
						mu.Lock()
						c.errorf("concurrent cached evaluation: %s, direct %s", describe(got), describe(want[i]))
						mu.Unlock()
					}
				}
			}
		}()
	}
	wg.Wait()
}

// ---------------------------------------------------------------------------
// FuzzEvaluate

// fuzzOperators are PostHog's operator names (local evaluation knows the ones in
// knownOperators), plus names it must treat as unknown.
var fuzzOperators = []string{
	"exact", "is_not", "is_set", "is_not_set", "icontains", "not_icontains",
	"starts_with", "not_starts_with", "ends_with", "not_ends_with", "regex", "not_regex",
	"gt", "gte", "lt", "lte", "is_date_before", "is_date_after",
	"semver_eq", "semver_neq", "semver_gt", "semver_gte", "semver_lt", "semver_lte",
	"semver_tilde", "semver_caret", "semver_wildcard",
	"in", "not_in", "flag_evaluates_to", "", "is_date_exact", "EXACT",
}

// knownOperators are the property operators local evaluation supports ("" means
// exact). Everything else is inconclusive.
var knownOperators = map[string]bool{
	"": true, "exact": true, "is_not": true, "is_set": true, "is_not_set": true,
	"icontains": true, "not_icontains": true, "starts_with": true, "not_starts_with": true,
	"ends_with": true, "not_ends_with": true, "regex": true, "not_regex": true,
	"gt": true, "gte": true, "lt": true, "lte": true, "is_date_before": true, "is_date_after": true,
	"semver_eq": true, "semver_neq": true, "semver_gt": true, "semver_gte": true,
	"semver_lt": true, "semver_lte": true, "semver_tilde": true, "semver_caret": true, "semver_wildcard": true,
}

// complementOps pairs operators whose answers are opposite for any non-null
// property value whenever both are conclusive.
var complementOps = map[string]string{
	"": "is_not", "exact": "is_not", "is_not": "exact",
	"icontains": "not_icontains", "not_icontains": "icontains",
	"starts_with": "not_starts_with", "not_starts_with": "starts_with",
	"ends_with": "not_ends_with", "not_ends_with": "ends_with",
	"regex": "not_regex", "not_regex": "regex",
	"gt": "lte", "lte": "gt", "gte": "lt", "lt": "gte",
	"semver_eq": "semver_neq", "semver_neq": "semver_eq",
	"semver_gt": "semver_lte", "semver_lte": "semver_gt",
	"semver_gte": "semver_lt", "semver_lt": "semver_gte",
}

// selfMatch says how an operator answers when the property holds the filter's own
// value (a string, number, boolean or object): true, false, or "" when either
// answer (or inconclusive) is possible. A conclusive answer must be this one.
var selfMatch = map[string]string{
	"": "true", "exact": "true", "is_not": "false", "is_set": "true",
	"icontains": "true", "not_icontains": "false",
	"starts_with": "true", "not_starts_with": "false",
	"ends_with": "true", "not_ends_with": "false",
	"gt": "false", "gte": "true", "lt": "false", "lte": "true",
	"is_date_before": "false", "is_date_after": "false",
	"semver_eq": "true", "semver_neq": "false", "semver_gt": "false", "semver_gte": "true",
	"semver_lt": "false", "semver_lte": "true",
	"semver_tilde": "true", "semver_caret": "true", "semver_wildcard": "true",
}

// caseInsensitive lists operators whose answer does not change when the ASCII
// letters of a string property swap case (with the filter's own string value:
// all of them match).
var caseInsensitive = map[string]string{
	"": "true", "exact": "true", "is_not": "false",
	"icontains": "true", "not_icontains": "false",
	"starts_with": "true", "not_starts_with": "false",
	"ends_with": "true", "not_ends_with": "false",
}

func FuzzEvaluate(f *testing.F) {
	long := strings.Repeat("ab", 5000)
	medium := strings.Repeat("ab", 128)
	values := []struct{ filter, prop string }{
		{`"abc"`, "ABC"},
		{`"(a+)+$"`, strings.Repeat("a", 40) + "!"},
		{`"(?=x)"`, "x"},
		{`"["`, "["},
		{`"^[a-z]+@example\\.com$"`, "user@example.com"},
		{`"-6h"`, "2024-06-15T09:00:00Z"},
		{`"7d"`, "2024-06-01"},
		{`"2022-05-01T10:00:00+01:00"`, "2022-05-01T09:00:00Z"},
		{`"May 1, 2022"`, "1 May 2022"},
		{`"99999y"`, "2000-01-01"},
		{`"2024"`, "2024"},
		{`"2024-06-20"`, "2024"},
		{`"v1.2.3-beta"`, "1.2.3"},
		{`"01.2"`, "1.2"},
		{`"1.*"`, "1.9.9"},
		{`"*"`, "1.0.0"},
		{`"99999999999999999999999.1.1"`, "99999999999999999999999.1.2"},
		{`"İstanbul"`, "i̇stanbul"},
		{`"ΟΔΟΣ"`, "οδος"},
		{`"straße"`, "STRASSE"},
		{`"\u00ff\ufffd"`, "\xff\xfe"},
		{`1e400`, "1e400"},
		{`-0.0`, "0"},
		{`10`, "9.5"},
		{`["a", "B", 3]`, "b"},
		{`[true, "TRUE"]`, "true"},
		{`true`, "True"},
		{`null`, "None"},
		{`{"b": [1, {"a": null}], "a": "x"}`, `{"a":"x","b":[1,{"a":null}]}`},
		{`not json {`, "not json {"},
		{`"ab"`, long},
		{`"` + medium + `"`, medium + "x"},
		{"\"\xff\xfe\"", "\xff\xfe"},
	}
	ids := []string{"user-1", "", "ünïcödé-İ", strings.Repeat("id", 200)}
	for i, op := range fuzzOperators {
		for j, v := range values {
			f.Add(op, v.filter, v.prop, ids[(i+j)%len(ids)])
		}
	}
	f.Fuzz(func(t *testing.T, op, filterValueJSON, propertyValue, distinctID string) {
		input := fmt.Sprintf("operator %s, filter value %s, property value %s, distinct id %s",
			quoteInput(op), quoteInput(filterValueJSON), quoteInput(propertyValue), quoteInput(distinctID))
		guarded(t, input, func(c *checker) { checkOperator(c, op, filterValueJSON, propertyValue, distinctID) })
	})
}

// filterValueRaw is the JSON of the filter value: the text itself when it is one
// valid JSON value, otherwise the text as a JSON string.
func filterValueRaw(text string) []byte {
	if json.Valid([]byte(text)) {
		return []byte(text)
	}
	b, _ := json.Marshal(text)
	return b
}

// operatorDocument builds definitions around one property filter on "p":
//
//   - f: the filter, rollout 50 %, variants a (25 %), b (25 %), c (50 %), payload on a;
//   - f-all: the filter, rollout 100 %, payloads for true and false;
//   - f-bool: the filter, rollout 50 %;
//   - f-neg: the complementary operator, rollout 100 % (when op has one);
//   - f-dep: depends on f-all being true; f-variant: depends on f being "a";
//   - f-cohort / f-not-cohort: in / not in a cohort made of the filter;
//   - f-negation: a cohort holding the filter with negation;
//   - f-group: the filter on a company's properties, rollout 50 % by group key;
//   - f-device: the filter, rollout 50 % by device id.
func operatorDocument(op string, value []byte) []byte {
	filter := func(op string, negation bool) string {
		opJSON, _ := json.Marshal(op)
		s := `{"key": "p", "type": "person", "operator": ` + string(opJSON) + `, "value": ` + string(value)
		if negation {
			s += `, "negation": true`
		}
		return s + `}`
	}
	flag := func(key, conditions, extra string) string {
		return `{"key": "` + key + `", "active": true, "filters": {"groups": [` + conditions + `]` + extra + `}}`
	}
	flags := []string{
		flag("f", `{"properties": [`+filter(op, false)+`], "rollout_percentage": 50}`,
			`, "multivariate": {"variants": [{"key": "a", "rollout_percentage": 25}, {"key": "b", "rollout_percentage": 25}, {"key": "c", "rollout_percentage": 50}]}, "payloads": {"a": "{\"variant\": \"a\"}"}`),
		flag("f-all", `{"properties": [`+filter(op, false)+`], "rollout_percentage": 100}`,
			`, "payloads": {"true": "{\"on\": true}", "false": "{\"on\": false}"}`),
		flag("f-bool", `{"properties": [`+filter(op, false)+`], "rollout_percentage": 50}`, ``),
		flag("f-dep", `{"properties": [{"key": "f-all", "type": "flag", "operator": "flag_evaluates_to", "value": true, "dependency_chain": ["f-all"]}], "rollout_percentage": 100}`, ``),
		flag("f-variant", `{"properties": [{"key": "f", "type": "flag", "operator": "flag_evaluates_to", "value": "a", "dependency_chain": ["f"]}], "rollout_percentage": 100}`, ``),
		flag("f-cohort", `{"properties": [{"key": "id", "type": "cohort", "value": 1}], "rollout_percentage": 100}`, ``),
		flag("f-not-cohort", `{"properties": [{"key": "id", "type": "cohort", "operator": "not_in", "value": 1}], "rollout_percentage": 100}`, ``),
		flag("f-negation", `{"properties": [{"key": "id", "type": "cohort", "value": 2}], "rollout_percentage": 100}`, ``),
		flag("f-group", `{"properties": [`+filter(op, false)+`], "rollout_percentage": 50}`, `, "aggregation_group_type_index": 0`),
		flag("f-device", `{"properties": [`+filter(op, false)+`], "rollout_percentage": 50}`, `, "bucketing_identifier": "device_id"`),
	}
	if neg, ok := complementOps[op]; ok {
		flags = append(flags, flag("f-neg", `{"properties": [`+filter(neg, false)+`], "rollout_percentage": 100}`, ``))
	}
	return []byte(`{"flags": [` + strings.Join(flags, ", ") + `], "group_type_mapping": {"0": "company"}, "cohorts": {` +
		`"1": {"type": "OR", "values": [{"type": "AND", "values": [` + filter(op, false) + `]}]}, ` +
		`"2": {"type": "AND", "values": [` + filter(op, true) + `]}}}`)
}

func asciiSwapCase(s string) string {
	b := []byte(s)
	for i, c := range b {
		switch {
		case 'a' <= c && c <= 'z':
			b[i] = c - 'a' + 'A'
		case 'A' <= c && c <= 'Z':
			b[i] = c - 'A' + 'a'
		}
	}
	return string(b)
}

// maxRegexWork bounds len(pattern) × len(text) for the regex operators. RE2
// matching costs O(len(pattern) × len(text)) by design: with a few kilobytes of
// each, one evaluation takes tens of milliseconds, and the hundreds of
// evaluations checkOperator makes would pass the hang limit without anything
// being wrong.
const maxRegexWork = 1 << 18

func checkOperator(c *checker, op, filterValueJSON, propertyValue, distinctID string) {
	raw := filterValueRaw(filterValueJSON)
	if (op == "regex" || op == "not_regex") && len(raw)*max(len(raw), len(propertyValue)) > maxRegexWork {
		return
	}
	doc := operatorDocument(op, raw)
	defs, err := eval.Parse(doc)
	if err != nil {
		c.errorf("Parse of a generated document failed: %v\n%s", err, doc)
		return
	}
	// The filter value as the definitions hold it; invalid when it cannot be a
	// Value (then every flag built on it is malformed).
	filterValue, filterErr := eval.ParseJSONValue(raw)
	if filterErr == nil {
		if fl, _ := defs.Flag("f-all"); fl.Broken() != "" {
			c.errorf("filter value %s is a valid value but the flag is broken: %s", raw, fl.Broken())
		}
	}

	type subject struct {
		name string
		p    *eval.Value // nil: the property is missing
		// expect is the answer f-all must give when conclusive ("" for any),
		// from selfMatch or caseInsensitive.
		expect string
	}
	str := eval.String(propertyValue)
	subjects := []subject{{name: "string property", p: &str}, {name: "no property"}}
	if v, err := eval.ParseJSONValue([]byte(propertyValue)); err == nil {
		subjects = append(subjects, subject{name: "JSON property", p: &v})
	}
	if filterErr == nil {
		switch filterValue.Kind() {
		case eval.KindString, eval.KindNumber, eval.KindBool, eval.KindObject:
			fv := filterValue
			subjects = append(subjects, subject{name: "property equal to the filter value", p: &fv, expect: selfMatch[op]})
		}
		if filterValue.Kind() == eval.KindString && utf8.ValidString(filterValue.Text()) {
			swapped := eval.String(asciiSwapCase(filterValue.Text()))
			subjects = append(subjects, subject{name: "filter value with ASCII case swapped", p: &swapped, expect: caseInsensitive[op]})
		}
	}

	// A pattern python's re rejects answers false for regex and not_regex.
	regexValid := true
	for _, w := range defs.Warnings() {
		if strings.Contains(w.Message, "not a valid python regular expression") {
			regexValid = false
		}
	}

	// One cache for every subject: they share the distinct id, so only their
	// properties tell their entries apart.
	set := defs.FlagSet(nil)
	shared := allCache(16)

	// The same holds when NUL bytes move the boundary between a property's
	// value and the next property's key.
	nulA := &eval.Subject{DistinctID: distinctID, Now: fuzzNow, Person: eval.Properties{
		{Key: "p", Value: eval.String(propertyValue + "\x00")}, {Key: "q", Value: eval.String("v")}}}
	nulB := &eval.Subject{DistinctID: distinctID, Now: fuzzNow, Person: eval.Properties{
		{Key: "p", Value: eval.String(propertyValue)}, {Key: "\x00q", Value: eval.String("v")}}}
	for _, s := range []*eval.Subject{nulA, nulB} {
		got := cacheEvaluate(shared, set, s)
		checkResults(c, defs, s, "cache shared by subjects with NUL bytes in properties", set, &got, set.Keys(), evaluateAll(defs, s))
	}

	for _, sub := range subjects {
		s := &eval.Subject{DistinctID: distinctID, DeviceID: "device-" + distinctID, Now: fuzzNow,
			Groups: []eval.Group{{Type: "company", Key: "company-" + distinctID}}}
		if sub.p != nil {
			s.Person = eval.Properties{{Key: "p", Value: *sub.p}}
			s.Groups[0].Properties = s.Person
		}
		direct := checkSubject(c, defs, s)
		sharedRes := cacheEvaluate(shared, set, s)
		checkResults(c, defs, s, "cache shared by subjects with one distinct id ("+sub.name+")", set, &sharedRes, set.Keys(), direct)
		if anyTimedOut(direct) {
			// The flags below are compared with each other; one whose regex
			// match ran out of time says nothing about the others.
			continue
		}
		where := func(key string) string {
			return fmt.Sprintf("%s, flag %s (operator %q, filter value %s)", sub.name, key, op, raw)
		}
		all, f, fBool := direct["f-all"], direct["f"], direct["f-bool"]

		// Unknown operators and is_not_set are never decided locally; a missing
		// property cannot be decided either.
		if utf8.ValidString(op) && !knownOperators[op] && !all.Inconclusive() {
			c.errorf("%s: unknown operator answered %s", where("f-all"), describe(all))
		}
		if op == "is_not_set" && !all.Inconclusive() {
			c.errorf("%s: is_not_set answered %s", where("f-all"), describe(all))
		}
		if sub.p == nil && !all.Inconclusive() {
			c.errorf("%s: missing property answered %s", where("f-all"), describe(all))
		}
		if op == "is_set" && sub.p != nil && !sub.p.IsNull() && !all.Inconclusive() && !all.Enabled {
			c.errorf("%s: is_set with the property present answered %s", where("f-all"), describe(all))
		}

		// Rollout and variant selection follow PostHog's hash exactly.
		if f.Inconclusive() != all.Inconclusive() || fBool.Inconclusive() != all.Inconclusive() {
			c.errorf("%s: rollout changed conclusiveness: f %s, f-bool %s, f-all %s", where("f"), describe(f), describe(fBool), describe(all))
		}
		if !all.Inconclusive() {
			inF := eval.Hash("f", distinctID, "") <= 0.5
			if f.Enabled != (all.Enabled && inF) {
				c.errorf("%s: %s, but f-all %s and rollout hash in=%v", where("f"), describe(f), describe(all), inF)
			}
			inBool := eval.Hash("f-bool", distinctID, "") <= 0.5
			if fBool.Enabled != (all.Enabled && inBool) {
				c.errorf("%s: %s, but f-all %s and rollout hash in=%v", where("f-bool"), describe(fBool), describe(all), inBool)
			}
			if fBool.Variant != "" {
				c.errorf("%s: boolean flag answered a variant: %s", where("f-bool"), describe(fBool))
			}
			if f.Enabled {
				h := eval.Hash("f", distinctID, "variant")
				want := "c"
				switch {
				case h < 0.25:
					want = "a"
				case h < 0.5:
					want = "b"
				}
				if h < 1 && f.Variant != want {
					c.errorf("%s: variant %q, want %q (variant hash %v): %s", where("f"), f.Variant, want, h, describe(f))
				}
				if f.Variant == "a" && (f.Payload == nil || string(f.Payload.JSON) != `{"variant": "a"}`) {
					c.errorf("%s: variant a without its payload: %s", where("f"), describe(f))
				}
				if f.Variant != "a" && f.Payload != nil {
					c.errorf("%s: variant %q has no payload, got %s", where("f"), f.Variant, describe(f))
				}
			}
			wantPayload := `{"on": false}`
			if all.Enabled {
				wantPayload = `{"on": true}`
			}
			if all.Payload == nil || string(all.Payload.JSON) != wantPayload {
				c.errorf("%s: payload for %s should be %s: %s", where("f-all"), all.Value(), wantPayload, describe(all))
			}
		}

		// The same filter on a group's properties, or bucketed by device id,
		// differs only in the rollout hash.
		for _, b := range []struct{ key, bucket string }{{"f-group", s.Groups[0].Key}, {"f-device", s.DeviceID}} {
			r := direct[b.key]
			if r.Inconclusive() != all.Inconclusive() {
				c.errorf("%s: %s, but f-all %s", where(b.key), describe(r), describe(all))
				continue
			}
			in := eval.Hash(b.key, b.bucket, "") <= 0.5
			if !all.Inconclusive() && r.Enabled != (all.Enabled && in) {
				c.errorf("%s: %s, but f-all %s and rollout hash of %q in=%v", where(b.key), describe(r), describe(all), b.bucket, in)
			}
		}

		// Dependencies and cohorts built on the same filter agree with it.
		equivalent := func(key string, negated bool) {
			r := direct[key]
			if r.Inconclusive() != all.Inconclusive() {
				c.errorf("%s: %s, but f-all %s", where(key), describe(r), describe(all))
				return
			}
			if !r.Inconclusive() && r.Enabled != (all.Enabled != negated) {
				c.errorf("%s: %s, but f-all %s", where(key), describe(r), describe(all))
			}
		}
		equivalent("f-dep", false)
		equivalent("f-cohort", false)
		equivalent("f-not-cohort", true)
		equivalent("f-negation", true)
		if v := direct["f-variant"]; v.Inconclusive() != f.Inconclusive() ||
			(!v.Inconclusive() && v.Enabled != (f.Variant == "a")) {
			c.errorf("%s: %s, but f %s", where("f-variant"), describe(v), describe(f))
		}

		// Complementary operators answer oppositely on non-null values.
		if neg, ok := direct["f-neg"]; ok {
			if neg.Inconclusive() != all.Inconclusive() {
				c.errorf("%s: complementary operator %q: %s, but f-all %s", where("f-neg"), complementOps[op], describe(neg), describe(all))
			}
			regexPair := op == "regex" || op == "not_regex"
			if sub.p != nil && !sub.p.IsNull() && !neg.Inconclusive() && !all.Inconclusive() &&
				(!regexPair || regexValid) && neg.Enabled == all.Enabled {
				c.errorf("%s: complementary operator %q answers the same: %s and f-all %s",
					where("f-neg"), complementOps[op], describe(neg), describe(all))
			}
		}

		// The property holding the filter's own value (or its case-swapped
		// spelling) gives a known answer.
		if sub.expect != "" && !all.Inconclusive() && strconv.FormatBool(all.Enabled) != sub.expect {
			c.errorf("%s: property %s against its own value: %s, want %s", where("f-all"), sub.p.Text(), describe(all), sub.expect)
		}
	}
}

func anyTimedOut(results map[string]eval.Result) bool {
	for _, r := range results {
		if r.Reason == eval.ReasonRegexTimeout {
			return true
		}
	}
	return false
}

// allCache is a cache that keeps every set's answers, however cheap the set,
// so the fuzzers exercise the cached path.
func allCache(size int) *eval.Cache {
	c := eval.NewCache(size)
	c.SetMinCost(0)
	return c
}

// cacheEvaluate is Cache.Evaluate returning the results.
func cacheEvaluate(c *eval.Cache, set *eval.FlagSet, s *eval.Subject) eval.Results {
	var r eval.Results
	c.Evaluate(set, s, &r)
	return r
}

// ---------------------------------------------------------------------------
// FuzzRegexFallback

// regexSlack is what a regex filter's evaluation may take beyond its budget
// (two attempts of RegexMatchTimeout, see regex.go) before it counts as a
// stall: far below any runaway backtracking, far above scheduling noise on a
// loaded machine or under the race detector.
const regexSlack = 500 * time.Millisecond

// FuzzRegexFallback: any pattern and value evaluate through the regex and
// not_regex operators without panicking, within the match-time budget, and
// the two operators agree with each other. Seeded with patterns whose
// backtracking is exponential.
//
//	go test -run '^$' -fuzz '^FuzzRegexFallback$' -fuzztime 60s ./eval/
func FuzzRegexFallback(f *testing.F) {
	long := strings.Repeat("a", 5000)
	for _, seed := range []struct{ pattern, value string }{
		{`(a+)+$`, strings.Repeat("a", 40) + "!"},
		{`(a+)+$`, strings.Repeat("a", 40) + "!\n"}, // a final newline sends "$" to the backtracking engine
		{`(a|aa)+b`, strings.Repeat("a", 60)},
		{`(?=(a+))\1`, long},
		{`(?=(a+)+$)x`, strings.Repeat("a", 40) + "!"},
		{`(.*a){20}`, strings.Repeat("a", 40)},
		{`(.*a){20}(?=b)`, long},
		{`(a|b){1001}`, strings.Repeat("ab", 600)},
		{`(a|b){1001}c`, strings.Repeat("ab", 2000)},
		{`(x+x+)+y(?=z)`, strings.Repeat("x", 50)},
		{`^(\w+\s?)*$(?<!!)`, strings.Repeat("word ", 30) + "!"},
		{`(?<=@)example\.com$`, "jane@example.com"},
		{`\bé\b`, "é"},
		{`(?i)(?x) a + (?# comment) b`, "AAB"},
		{`[`, "["},
		{`a{4294967295}`, "a"},
		{`\N{EM DASH}`, "—"},
	} {
		f.Add(seed.pattern, seed.value)
	}
	f.Fuzz(func(t *testing.T, pattern, value string) {
		// RE2's linear time still grows with pattern × value; keep each
		// input's work small enough that time measures backtracking only.
		if len(pattern)*max(len(value), 1) > 1<<20 {
			return
		}
		patternJSON, _ := json.Marshal(pattern)
		doc := `{"flags": [
			{"key": "re", "active": true, "filters": {"groups": [{"properties": [{"key": "p", "operator": "regex", "value": ` + string(patternJSON) + `}]}]}},
			{"key": "not-re", "active": true, "filters": {"groups": [{"properties": [{"key": "p", "operator": "not_regex", "value": ` + string(patternJSON) + `}]}]}}]}`
		defs, err := eval.Parse([]byte(doc))
		if err != nil {
			t.Fatalf("Parse: %v", err)
		}
		valid := true
		for _, w := range defs.Warnings() {
			if strings.Contains(w.Message, "not a valid python regular expression") {
				valid = false
			}
		}
		reFlag, _ := defs.Flag("re")
		backtracking := len(reFlag.BacktrackingRegexes()) > 0
		s := &eval.Subject{DistinctID: "u", Person: eval.Properties{{Key: "p", Value: eval.String(value)}}}
		var results [2]eval.Result
		for i, key := range []string{"re", "not-re"} {
			start := time.Now()
			results[i] = defs.Evaluate(key, s)
			if elapsed := time.Since(start); elapsed > 2*eval.RegexMatchTimeout+regexSlack {
				t.Fatalf("%s %q on %s took %v (budget %v per attempt)", key, pattern, quoteInput(value), elapsed, eval.RegexMatchTimeout)
			}
			r := results[i]
			switch {
			case r.Reason == eval.ReasonRegexTimeout:
				// Only the backtracking engine runs out of time: a pattern
				// RE2 cannot run, or a value RE2 reads differently from python.
				guarded := value == "" || strings.HasSuffix(value, "\n") || !isASCII(value)
				if !backtracking && !guarded {
					t.Errorf("%s %q on %s: regex_timeout from a pattern RE2 runs", key, pattern, quoteInput(value))
				}
			case r.Inconclusive() && r.Reason != eval.ReasonInvalidValue:
				t.Errorf("%s %q on %s: inconclusive for %s", key, pattern, quoteInput(value), r.Reason)
			}
		}
		re, notRe := results[0], results[1]
		if re.Inconclusive() || notRe.Inconclusive() {
			if re.Reason == eval.ReasonInvalidValue != (notRe.Reason == eval.ReasonInvalidValue) {
				t.Errorf("%q: a pattern local evaluation cannot run must be so for both operators: %s, %s", pattern, describe(re), describe(notRe))
			}
			return
		}
		switch {
		case !valid && (re.Enabled || notRe.Enabled):
			t.Errorf("%q is invalid, yet regex %v, not_regex %v", pattern, re.Enabled, notRe.Enabled)
		case valid && re.Enabled == notRe.Enabled:
			t.Errorf("%q on %s: regex and not_regex both %v", pattern, quoteInput(value), re.Enabled)
		}
	})
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

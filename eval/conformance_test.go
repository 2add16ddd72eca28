package eval

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

// The conformance vectors were recorded from PostHog's own SDKs. Every case in
// every file must pass. FLAGSPLIT_CONFORMANCE_DIR adds other folders of files in
// the same format (several separated by the OS list separator; every *.json
// file below each, subfolders included).

type conformanceSuite struct {
	Source string          `json:"source"`
	Flags  json.RawMessage `json:"flags"`
	Cases  []struct {
		Flag             string                      `json:"flag"`
		DistinctID       string                      `json:"distinct_id"`
		DeviceID         string                      `json:"device_id"`
		PersonProps      map[string]Value            `json:"person_properties"`
		Groups           map[string]Value            `json:"groups"`
		GroupProps       map[string]map[string]Value `json:"group_properties"`
		Now              string                      `json:"now"`
		Expect           json.RawMessage             `json:"expect"`
		ExpectPayload    json.RawMessage             `json:"expect_payload"`
		HasExpectPayload bool                        `json:"-"`
		// note, sdk_divergence and python_snapshot_expect are information
		// for readers; the evaluator answers expect.
	} `json:"cases"`
}

type hashFile struct {
	Cases []struct {
		Key        *string  `json:"key"`
		DistinctID string   `json:"distinct_id"`
		Salt       string   `json:"salt"`
		RawInput   *string  `json:"raw_input"`
		Expect     float64  `json:"expect"`
		Tolerance  *float64 `json:"tolerance"`
		Source     string   `json:"source"`
	} `json:"cases"`
}

// conformanceFile is one vector file; own files are this package's, held to
// well-formed definitions.
type conformanceFile struct {
	path string
	own  bool
}

func conformanceFiles(t *testing.T) []conformanceFile {
	t.Helper()
	own, err := filepath.Glob(filepath.Join("testdata", "conformance", "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	if len(own) == 0 {
		t.Fatal("no conformance files found")
	}
	sort.Strings(own)
	var files []conformanceFile
	for _, f := range own {
		files = append(files, conformanceFile{path: f, own: true})
	}
	for _, dir := range filepath.SplitList(os.Getenv("FLAGSPLIT_CONFORMANCE_DIR")) {
		if dir == "" {
			continue
		}
		var extra []string
		err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !d.IsDir() && strings.EqualFold(filepath.Ext(path), ".json") {
				extra = append(extra, path)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("FLAGSPLIT_CONFORMANCE_DIR: %v", err)
		}
		if len(extra) == 0 {
			t.Fatalf("FLAGSPLIT_CONFORMANCE_DIR=%s holds no *.json files", dir)
		}
		sort.Strings(extra)
		for _, f := range extra {
			files = append(files, conformanceFile{path: f})
		}
	}
	return files
}

// parseNow reads a case's clock: ISO 8601 in UTC, with or without an offset,
// fraction or time of day.
func parseNow(s string) (time.Time, error) {
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05.999999999", "2006-01-02 15:04:05.999999999Z07:00", "2006-01-02 15:04:05.999999999", "2006-01-02"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t.UTC(), nil
		}
	}
	return time.Time{}, fmt.Errorf("now %q is not an ISO 8601 time", s)
}

func TestConformance(t *testing.T) {
	total := 0
	for _, file := range conformanceFiles(t) {
		data, err := os.ReadFile(file.path)
		if err != nil {
			t.Fatal(err)
		}
		trimmed := bytes.TrimSpace(data)
		if len(trimmed) > 0 && trimmed[0] == '{' {
			total += runHashFile(t, file.path, data)
			continue
		}
		total += runSuiteFile(t, file, data)
	}
	t.Logf("%d conformance cases", total)
}

// reporter is what the runners report to: a *testing.T, or a recorder in the
// test of the runners themselves.
type reporter interface {
	Errorf(format string, args ...any)
	Logf(format string, args ...any)
}

func runHashFile(t reporter, file string, data []byte) int {
	var hf hashFile
	if err := json.Unmarshal(data, &hf); err != nil {
		t.Errorf("%s: %v", file, err)
		return 0
	}
	for i, c := range hf.Cases {
		var got float64
		var input string
		if c.RawInput != nil {
			input = *c.RawInput
			got = HashRaw(input)
		} else if c.Key != nil {
			input = *c.Key + "." + c.DistinctID + c.Salt
			got = Hash(*c.Key, c.DistinctID, c.Salt)
		} else {
			t.Errorf("%s case %d: neither key nor raw_input", file, i)
			continue
		}
		ok := got == c.Expect
		if c.Tolerance != nil {
			ok = math.Abs(got-c.Expect) <= *c.Tolerance
		}
		if !ok {
			t.Errorf("%s case %d (%s): hash(%q) = %v, want %v", filepath.Base(file), i, c.Source, input, got, c.Expect)
		}
	}
	return len(hf.Cases)
}

func runSuiteFile(t reporter, cf conformanceFile, data []byte) int {
	file := cf.path
	var suites []conformanceSuite
	if err := json.Unmarshal(data, &suites); err != nil {
		t.Errorf("%s: %v", file, err)
		return 0
	}
	// A second decode tells an absent expect_payload from an explicit null.
	var rawSuites []struct {
		Cases []map[string]json.RawMessage `json:"cases"`
	}
	if err := json.Unmarshal(data, &rawSuites); err != nil {
		t.Errorf("%s: %v", file, err)
		return 0
	}
	n := 0
	for si, suite := range suites {
		defs, err := Parse(suite.Flags)
		if err != nil {
			t.Errorf("%s suite %d (%s): parse: %v", filepath.Base(file), si, suite.Source, err)
			continue
		}
		if p := defs.Problems(); len(p) > 0 {
			// Other sets may hold definitions PostHog's SDKs read though
			// they are malformed; only the answers count there.
			if cf.own {
				t.Errorf("%s suite %d (%s): unexpected problems: %v", filepath.Base(file), si, suite.Source, p)
			} else {
				t.Logf("%s suite %d (%s): problems: %v", file, si, suite.Source, p)
			}
		}
		for ci, c := range suite.Cases {
			n++
			_, c.HasExpectPayload = rawSuites[si].Cases[ci]["expect_payload"]
			subj := Subject{DistinctID: c.DistinctID, DeviceID: c.DeviceID, Person: PropertiesFromMap(c.PersonProps)}
			for typ, key := range c.Groups {
				subj.Groups = append(subj.Groups, Group{Type: typ, Key: key.Text(), Properties: PropertiesFromMap(c.GroupProps[typ])})
			}
			if c.Now != "" {
				now, err := parseNow(c.Now)
				if err != nil {
					t.Errorf("%s suite %d case %d: %v", file, si, ci, err)
					continue
				}
				subj.Now = now
			}
			got := defs.Evaluate(c.Flag, &subj)
			where := fmt.Sprintf("%s suite %d case %d (%s) flag %q distinct_id %q", file, si, ci, suite.Source, c.Flag, c.DistinctID)
			if msg := checkExpect(c.Expect, got); msg != "" {
				t.Errorf("%s: %s", where, msg)
				continue
			}
			if c.HasExpectPayload {
				if msg := checkPayload(c.ExpectPayload, got); msg != "" {
					t.Errorf("%s: %s", where, msg)
				}
			}
		}
	}
	return n
}

func checkExpect(expect json.RawMessage, got Result) string {
	var want any
	if err := json.Unmarshal(expect, &want); err != nil {
		return "bad expect: " + err.Error()
	}
	switch w := want.(type) {
	case map[string]any:
		if w["inconclusive"] == true {
			if !got.Inconclusive() {
				return fmt.Sprintf("got %s (%s), want inconclusive", got.Value(), got.Reason)
			}
			return ""
		}
		return fmt.Sprintf("unknown expectation %v", w)
	case bool:
		if got.Inconclusive() {
			return fmt.Sprintf("got inconclusive (%s), want %v", got.Reason, w)
		}
		if got.Enabled != w || got.Variant != "" {
			return fmt.Sprintf("got %s (%s), want %v", got.Value(), got.Reason, w)
		}
	case string:
		if got.Inconclusive() {
			return fmt.Sprintf("got inconclusive (%s), want %q", got.Reason, w)
		}
		if got.Variant != w {
			return fmt.Sprintf("got %s (%s), want %q", got.Value(), got.Reason, w)
		}
	default:
		return fmt.Sprintf("unknown expectation %v", want)
	}
	return ""
}

func checkPayload(expect json.RawMessage, got Result) string {
	if string(bytes.TrimSpace(expect)) == "null" {
		if got.Payload != nil {
			return fmt.Sprintf("payload %s, want none", got.Payload.Raw)
		}
		return ""
	}
	if got.Payload == nil {
		return fmt.Sprintf("no payload, want %s", expect)
	}
	var a, b any
	if err := json.Unmarshal(expect, &a); err != nil {
		return err.Error()
	}
	if err := json.Unmarshal(got.Payload.Raw, &b); err != nil {
		return err.Error()
	}
	if !jsonEqual(a, b) {
		return fmt.Sprintf("payload %s, want %s", got.Payload.Raw, strings.TrimSpace(string(expect)))
	}
	return ""
}

func jsonEqual(a, b any) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return bytes.Equal(ja, jb)
}

type recorder struct{ errors, logs []string }

func (r *recorder) Errorf(format string, args ...any) {
	r.errors = append(r.errors, fmt.Sprintf(format, args...))
}
func (r *recorder) Logf(format string, args ...any) {
	r.logs = append(r.logs, fmt.Sprintf(format, args...))
}

// TestConformanceRunnerFailsOnMismatches: a wrong expectation, a wrong payload
// or an unreadable file is reported; unknown fields are not; malformed
// definitions fail only this package's own files.
func TestConformanceRunnerFailsOnMismatches(t *testing.T) {
	doc := `[{"source": "runner test", "flags": {"flags": [
		{"key": "on", "active": true, "filters": {"groups": [{"rollout_percentage": 100}], "payloads": {"true": "{\"a\": 1}"}}},
		{"key": "odd", "active": true, "filters": {"groups": [{"rollout_percentage": "all"}]}}]},
	  "cases": [
		{"flag": "on", "distinct_id": "u", "expect": true, "expect_payload": "{\"a\": 1}", "note": "passes", "sdk_divergence": {"posthog-go": false}, "python_snapshot_expect": true, "future_field": 1},
		{"flag": "on", "distinct_id": "u", "expect": false},
		{"flag": "on", "distinct_id": "u", "expect": {"inconclusive": true}},
		{"flag": "on", "distinct_id": "u", "expect": true, "expect_payload": null},
		{"flag": "odd", "distinct_id": "u", "expect": {"inconclusive": true}, "now": "2024-06-01T00:00:00"}]}]`
	for _, own := range []bool{false, true} {
		r := &recorder{}
		n := runSuiteFile(r, conformanceFile{path: "runner.json", own: own}, []byte(doc))
		wantErrors := 3 // cases 1-3
		if own {
			wantErrors++ // the malformed rollout
		}
		if n != 5 || len(r.errors) != wantErrors {
			t.Errorf("own=%v: %d cases, errors %q, want 5 cases and %d errors", own, n, r.errors, wantErrors)
		}
	}
	r := &recorder{}
	if runSuiteFile(r, conformanceFile{path: "broken.json"}, []byte(`[{"cases": 7}]`)); len(r.errors) != 1 {
		t.Errorf("an unreadable file: errors %q", r.errors)
	}
	r = &recorder{}
	if runHashFile(r, "hash.json", []byte(`{"cases": [{"raw_input": "x", "expect": 0.5}]}`)); len(r.errors) != 1 {
		t.Errorf("a wrong hash: errors %q", r.errors)
	}
}

package eval

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

// The conformance vectors were recorded from PostHog's own SDK test suites. Every
// case in every file must pass; FLAGSPLIT_CONFORMANCE_DIR adds another folder of
// files in the same format.

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

func conformanceFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("testdata", "conformance", "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	if dir := os.Getenv("FLAGSPLIT_CONFORMANCE_DIR"); dir != "" {
		extra, err := filepath.Glob(filepath.Join(dir, "*.json"))
		if err != nil {
			t.Fatal(err)
		}
		if len(extra) == 0 {
			t.Fatalf("FLAGSPLIT_CONFORMANCE_DIR=%s holds no *.json files", dir)
		}
		files = append(files, extra...)
	}
	if len(files) == 0 {
		t.Fatal("no conformance files found")
	}
	sort.Strings(files)
	return files
}

func TestConformance(t *testing.T) {
	total := 0
	for _, file := range conformanceFiles(t) {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		trimmed := bytes.TrimSpace(data)
		if len(trimmed) > 0 && trimmed[0] == '{' {
			total += runHashFile(t, file, data)
			continue
		}
		total += runSuiteFile(t, file, data)
	}
	t.Logf("%d conformance cases", total)
}

func runHashFile(t *testing.T, file string, data []byte) int {
	var hf hashFile
	if err := json.Unmarshal(data, &hf); err != nil {
		t.Fatalf("%s: %v", file, err)
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

func runSuiteFile(t *testing.T, file string, data []byte) int {
	var suites []conformanceSuite
	if err := json.Unmarshal(data, &suites); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	// A second decode tells an absent expect_payload from an explicit null.
	var rawSuites []struct {
		Cases []map[string]json.RawMessage `json:"cases"`
	}
	if err := json.Unmarshal(data, &rawSuites); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	n := 0
	for si, suite := range suites {
		defs, err := Parse(suite.Flags)
		if err != nil {
			t.Errorf("%s suite %d (%s): parse: %v", filepath.Base(file), si, suite.Source, err)
			continue
		}
		if p := defs.Problems(); len(p) > 0 {
			t.Errorf("%s suite %d (%s): unexpected problems: %v", filepath.Base(file), si, suite.Source, p)
		}
		for ci, c := range suite.Cases {
			n++
			_, c.HasExpectPayload = rawSuites[si].Cases[ci]["expect_payload"]
			subj := Subject{DistinctID: c.DistinctID, DeviceID: c.DeviceID, Person: PropertiesFromMap(c.PersonProps)}
			for typ, key := range c.Groups {
				subj.Groups = append(subj.Groups, Group{Type: typ, Key: key.Text(), Properties: PropertiesFromMap(c.GroupProps[typ])})
			}
			if c.Now != "" {
				now, err := time.Parse(time.RFC3339, c.Now)
				if err != nil {
					t.Fatalf("%s: bad now %q: %v", file, c.Now, err)
				}
				subj.Now = now
			}
			got := defs.Evaluate(c.Flag, &subj)
			where := fmt.Sprintf("%s suite %d case %d (%s) flag %q distinct_id %q", filepath.Base(file), si, ci, suite.Source, c.Flag, c.DistinctID)
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

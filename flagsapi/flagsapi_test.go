package flagsapi

import (
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/flagsplit/flagsplit/eval"
)

// recorded is a flags request posthog-js sent in the browser end to end test
// (e2e/browser/e2e.mjs --record writes them).
type recorded struct {
	PostHogJS  string            `json:"posthog_js"`
	URL        string            `json:"url"`
	Headers    map[string]string `json:"headers"`
	BodyBase64 string            `json:"body_base64"`
	name       string
	body       []byte
}

func loadRecorded(t *testing.T) []recorded {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("testdata", "posthogjs", "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no recorded requests: %v", err)
	}
	var out []recorded
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var r recorded
		if err := json.Unmarshal(data, &r); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if r.body, err = base64.StdEncoding.DecodeString(r.BodyBase64); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		r.name = filepath.Base(f)
		out = append(out, r)
	}
	return out
}

func (r recorded) query(t *testing.T) url.Values {
	t.Helper()
	u, err := url.Parse(r.URL)
	if err != nil {
		t.Fatal(err)
	}
	return u.Query()
}

// TestDecodeRecordedRequests decodes every body encoding posthog-js sent:
// its own request on load (gzip, recognised by the magic bytes: posthog-js
// drops compression=gzip-js from the URL), plain JSON, the base64 data= form
// and the legacy /decide form. Every encoding of one visitor's request
// decodes to the same request.
func TestDecodeRecordedRequests(t *testing.T) {
	wantEncoding := map[string]Encoding{
		"flags_v2_onload":  EncodingGzip,
		"flags_v2_gzip":    EncodingGzip,
		"flags_v2_json":    EncodingJSON,
		"flags_v2_base64":  EncodingBase64Form,
		"decide_v3_base64": EncodingBase64Form,
	}
	byVisitor := map[string][]Request{}
	for _, r := range loadRecorded(t) {
		visitor := "identified"
		if strings.HasSuffix(r.name, "_anonymous.json") {
			visitor = "anonymous"
		}
		kind := strings.TrimSuffix(r.name, "_"+visitor+".json")
		t.Run(r.name, func(t *testing.T) {
			req, enc, err := Decode(r.query(t), r.Headers["content-type"], r.body)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if want, ok := wantEncoding[kind]; !ok || enc != want {
				t.Errorf("encoding %s, want %s", enc, want)
			}
			if req.Token != "phc_e2e" || req.DistinctID == "" || req.DeviceID == "" {
				t.Errorf("token %q distinct_id %q device %q", req.Token, req.DistinctID, req.DeviceID)
			}
			if v, ok := req.PersonProperties.Get("$lib"); !ok || v.Text() != "web" {
				t.Errorf("$lib = %v", v)
			}
			if _, ok := req.PersonProperties.Get("plan"); !ok {
				t.Errorf("no plan in %v", req.PersonProperties)
			}
			if !json.Valid(req.JSON) {
				t.Errorf("JSON not kept: %q", req.JSON)
			}
			req.JSON = nil
			byVisitor[visitor] = append(byVisitor[visitor], req)
		})
	}
	for visitor, reqs := range byVisitor {
		for _, r := range reqs[1:] {
			if !reflect.DeepEqual(r, reqs[0]) {
				t.Errorf("%s: encodings decode differently:\n%+v\n%+v", visitor, r, reqs[0])
			}
		}
	}
	if id := byVisitor["identified"]; len(id) == 0 || !strings.HasPrefix(id[0].DistinctID, "user-") || id[0].AnonDistinctID == "" {
		t.Errorf("identified visitor: %+v", id)
	}
}

func gz(t *testing.T, s string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write([]byte(s)); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestDecodeForms covers what the recordings do not: numeric ids, groups
// with properties, flag_keys, unpadded and URL-alphabet base64, a '+' the
// form decoding turned into a space, a JSON form field, compression=gzip.
func TestDecodeForms(t *testing.T) {
	doc := `{"token":"phc_x","distinct_id":12345,"$device_id":"d1","groups":{"project":7,"company":"acme","none":null},
		"group_properties":{"company":{"tier":"gold","seats":40}},"person_properties":{"plan":"pro","age":31.5},
		"flag_keys":["a","b"],"disable_flags":"true"}`
	b64 := base64.StdEncoding.EncodeToString([]byte(doc))
	cases := []struct {
		name        string
		query       string
		contentType string
		body        []byte
		enc         Encoding
	}{
		{"json", "", "application/json", []byte(doc), EncodingJSON},
		{"gzip param", "compression=gzip", "text/plain", gz(t, doc), EncodingGzip},
		{"gzip-js param", "compression=gzip-js", "", gz(t, doc), EncodingGzip},
		{"form", "compression=base64", "application/x-www-form-urlencoded", []byte("data=" + url.QueryEscape(b64)), EncodingBase64Form},
		{"form with unescaped plus", "", "application/x-www-form-urlencoded", []byte("data=" + b64), EncodingBase64Form},
		{"form, raw url alphabet", "", "", []byte("data=" + base64.RawURLEncoding.EncodeToString([]byte(doc))), EncodingBase64Form},
		{"form holding JSON", "", "application/x-www-form-urlencoded", []byte("data=" + url.QueryEscape(doc)), EncodingBase64Form},
		{"bare base64", "compression=base64", "text/plain", []byte(b64), EncodingBase64},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			q, _ := url.ParseQuery(c.query)
			req, enc, err := Decode(q, c.contentType, c.body)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if enc != c.enc {
				t.Errorf("encoding %s, want %s", enc, c.enc)
			}
			if req.DistinctID != "12345" || req.DeviceID != "d1" || !req.DisableFlags || !reflect.DeepEqual(req.FlagKeys, []string{"a", "b"}) {
				t.Errorf("%+v", req)
			}
			if len(req.Groups) != 2 || req.Groups[0].Type != "company" || req.Groups[0].Key != "acme" || req.Groups[1].Key != "7" {
				t.Fatalf("groups %+v", req.Groups)
			}
			if v, _ := req.Groups[0].Properties.Get("seats"); v.Text() != "40" {
				t.Errorf("group property seats = %v", v)
			}
			if v, _ := req.PersonProperties.Get("age"); v.Text() != "31.5" {
				t.Errorf("age = %v", v)
			}
		})
	}
}

// TestDecodeRejects: what is not a flags request is an error, never a panic.
func TestDecodeRejects(t *testing.T) {
	bomb := gz(t, `{"distinct_id":"`+strings.Repeat("a", MaxBodySize+10)+`"}`)
	cases := map[string]struct {
		query, body string
	}{
		"broken gzip":       {"compression=gzip-js", "\x1f\x8b\x08\x00garbage"},
		"gzip bomb":         {"", string(bomb)},
		"not base64":        {"compression=base64", "!!!"},
		"form without data": {"", "data="},
		"not JSON":          {"", `{"distinct_id":`},
		"id an object":      {"", `{"distinct_id":{"a":1}}`},
		"JSON array":        {"", `[1,2]`},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			q, _ := url.ParseQuery(c.query)
			if _, _, err := Decode(q, "", []byte(c.body)); err == nil {
				t.Error("decoded")
			} else if name == "gzip bomb" && !errors.Is(err, ErrBodyTooLarge) {
				t.Errorf("err %v, want ErrBodyTooLarge", err)
			}
		})
	}
}

func sampleFlags() []Flag {
	yes := true
	return []Flag{
		{Key: "on", Enabled: true, HasExperiment: &yes, Reason: "condition_match", ConditionIndex: 0, Description: "Matched condition set 1", ID: 1, Version: 3, Payload: json.RawMessage(`"{\"a\": 1}"`)},
		{Key: "mv", Enabled: true, Variant: "test", Reason: "condition_match", ConditionIndex: 1, ID: 2, Version: 1, Payload: json.RawMessage(`{"b": [1, 2]}`)},
		{Key: "off", Reason: "out_of_rollout_bound", ConditionIndex: 0, ID: 3},
		{Key: "edge", Reason: ReasonEdgeInconclusive, ConditionIndex: -1, ID: 4, Description: "Not decidable"},
		{Key: "bad", Failed: true, Reason: "timeout", ConditionIndex: -1, ID: 5},
	}
}

// TestResponseShapes writes each format and reads it back the way
// posthog-js does (normalizeFlagsResponse: variant ?? enabled; payloads of
// the enabled flags), and compares with what PostHog's server writes for
// the same answers.
func TestResponseShapes(t *testing.T) {
	resp := Response{Flags: sampleFlags(), ErrorsWhileComputingFlags: true, RequestID: "req-1", EvaluatedAt: 1700000000000}
	wantValues := map[string]any{"on": true, "mv": "test", "off": false, "edge": false, "bad": false}

	var v2 map[string]any
	out := resp.Append(nil, FormatFlagsV2)
	if err := json.Unmarshal(out, &v2); err != nil {
		t.Fatalf("v2: %v: %s", err, out)
	}
	flags := v2["flags"].(map[string]any)
	for k, want := range wantValues {
		d := flags[k].(map[string]any)
		got := d["variant"]
		if got == nil {
			got = d["enabled"]
		}
		if got != want || d["key"] != k {
			t.Errorf("v2 %s = %v, want %v", k, got, want)
		}
		if _, ok := d["metadata"].(map[string]any)["id"]; !ok {
			t.Errorf("v2 %s: no metadata.id", k)
		}
	}
	if flags["bad"].(map[string]any)["failed"] != true || flags["on"].(map[string]any)["failed"] != nil {
		t.Error("failed is written for failed answers only")
	}
	if r := flags["edge"].(map[string]any)["reason"].(map[string]any); r["code"] != ReasonEdgeInconclusive || r["condition_index"] != nil {
		t.Errorf("edge reason %v", r)
	}
	if r := flags["mv"].(map[string]any)["reason"].(map[string]any); r["condition_index"] != 1.0 {
		t.Errorf("mv reason %v", r)
	}
	if v2["errorsWhileComputingFlags"] != true || v2["requestId"] != "req-1" || v2["evaluatedAt"] != 1.7e12 {
		t.Errorf("v2 top level %v", v2)
	}
	if md := flags["on"].(map[string]any)["metadata"].(map[string]any); md["has_experiment"] != true {
		t.Errorf("has_experiment: %v", md)
	}
	if _, ok := flags["off"].(map[string]any)["metadata"].(map[string]any)["has_experiment"]; ok {
		t.Error("has_experiment written though unknown")
	}
	if p := flags["on"].(map[string]any)["metadata"].(map[string]any)["payload"]; p != `{"a": 1}` {
		t.Errorf("payload as stored: %v", p)
	}

	var legacy struct {
		FeatureFlags              map[string]any             `json:"featureFlags"`
		FeatureFlagPayloads       map[string]json.RawMessage `json:"featureFlagPayloads"`
		ErrorsWhileComputingFlags bool                       `json:"errorsWhileComputingFlags"`
	}
	out = resp.Append(nil, FormatLegacy)
	if err := json.Unmarshal(out, &legacy); err != nil {
		t.Fatalf("legacy: %v: %s", err, out)
	}
	if !reflect.DeepEqual(legacy.FeatureFlags, wantValues) || !legacy.ErrorsWhileComputingFlags {
		t.Errorf("legacy %s", out)
	}
	if len(legacy.FeatureFlagPayloads) != 2 || string(legacy.FeatureFlagPayloads["mv"]) != `{"b":[1,2]}` {
		t.Errorf("legacy payloads %s", out)
	}

	var d2 struct {
		FeatureFlags map[string]any `json:"featureFlags"`
	}
	out = resp.Append(nil, FormatDecideV2)
	if err := json.Unmarshal(out, &d2); err != nil || !reflect.DeepEqual(d2.FeatureFlags, map[string]any{"on": true, "mv": "test"}) {
		t.Errorf("decide v2 %s (%v)", out, err)
	}
	var d1 struct {
		FeatureFlags []string `json:"featureFlags"`
	}
	out = resp.Append(nil, FormatDecideV1)
	if err := json.Unmarshal(out, &d1); err != nil || !reflect.DeepEqual(d1.FeatureFlags, []string{"on", "mv"}) {
		t.Errorf("decide v1 %s (%v)", out, err)
	}

	// Round trip through the fill-in parser, in both shapes.
	for _, f := range []Format{FormatFlagsV2, FormatLegacy} {
		p, err := ParseResponse(resp.Append(nil, f))
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for k, want := range wantValues {
			got := p.Flags[k]
			var v any = got.Enabled
			if got.Variant != "" {
				v = got.Variant
			}
			if v != want {
				t.Errorf("%s parsed %s = %v, want %v", f, k, v, want)
			}
		}
		if !p.Errors {
			t.Errorf("%s: errors lost", f)
		}
	}
}

// TestFormatFor follows PostHog's get_versioned_response.
func TestFormatFor(t *testing.T) {
	cases := []struct {
		decide bool
		v      string
		want   Format
	}{
		{false, "2", FormatFlagsV2}, {false, "3", FormatFlagsV2}, {false, "", FormatLegacy}, {false, "1", FormatLegacy}, {false, "x", FormatLegacy},
		{true, "4", FormatFlagsV2}, {true, "3", FormatLegacy}, {true, "2", FormatDecideV2}, {true, "1", FormatDecideV1}, {true, "", FormatDecideV1},
	}
	for _, c := range cases {
		if got := FormatFor(c.decide, c.v); got != c.want {
			t.Errorf("FormatFor(%v, %q) = %s, want %s", c.decide, c.v, got, c.want)
		}
	}
}

// TestBootstrapHTMLSafe: the bootstrap object is what posthog-js takes, and
// no key, variant or payload can end a <script> element or a JavaScript
// line.
func TestBootstrapHTMLSafe(t *testing.T) {
	b := Bootstrap{DistinctID: "</script><script>alert(1)</script>\u2028", IsIdentifiedID: true, Flags: []Flag{
		{Key: "a&b", Enabled: true, Variant: "<v>\u2029", Payload: json.RawMessage(`"</script>"`)},
		{Key: "off", Payload: json.RawMessage(`{"x": 1}`)},
		{Key: "bad\xffutf8", Enabled: true},
	}}
	out := b.AppendHTMLSafe(nil)
	for _, bad := range []string{"<", ">", "&", "\u2028", "\u2029"} {
		if bytes.Contains(out, []byte(bad)) {
			t.Errorf("%q in %s", bad, out)
		}
	}
	var got struct {
		DistinctID          string                     `json:"distinctID"`
		IsIdentifiedID      bool                       `json:"isIdentifiedID"`
		FeatureFlags        map[string]any             `json:"featureFlags"`
		FeatureFlagPayloads map[string]json.RawMessage `json:"featureFlagPayloads"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if got.DistinctID != b.DistinctID || !got.IsIdentifiedID {
		t.Errorf("identity %q %v", got.DistinctID, got.IsIdentifiedID)
	}
	want := map[string]any{"a&b": "<v>\u2029", "off": false, "bad\ufffdutf8": true}
	if !reflect.DeepEqual(got.FeatureFlags, want) {
		t.Errorf("flags %v, want %v", got.FeatureFlags, want)
	}
	var p string
	if len(got.FeatureFlagPayloads) != 1 || json.Unmarshal(got.FeatureFlagPayloads["a&b"], &p) != nil || p != "</script>" {
		t.Errorf("payloads %v", got.FeatureFlagPayloads)
	}
}

// TestAppendStringMatchesEncodingJSON: the hand-written string writer agrees
// with encoding/json on every kind of character.
func TestAppendStringMatchesEncodingJSON(t *testing.T) {
	for _, s := range []string{"", "plain", `quote " backslash \`, "ctl \x00\x01\x1f\t\n\r", "uni é 日本 🎉", "bad \xff\xfe", "<>&", "\u2028\u2029", "\x7f"} {
		var buf bytes.Buffer
		enc := json.NewEncoder(&buf)
		enc.SetEscapeHTML(true)
		if err := enc.Encode(s); err != nil {
			t.Fatal(err)
		}
		var want, got string
		if err := json.Unmarshal(bytes.TrimSpace(buf.Bytes()), &want); err != nil {
			t.Fatal(err)
		}
		for _, html := range []bool{false, true} {
			out := appendString(nil, s, html)
			if err := json.Unmarshal(out, &got); err != nil || got != want {
				t.Errorf("appendString(%q, %v) = %s, decodes to %q (%v), want %q", s, html, out, got, err, want)
			}
		}
		if html := appendString(nil, s, true); !bytes.Equal(html, bytes.TrimSpace(buf.Bytes())) {
			t.Errorf("html form of %q: %s, encoding/json writes %s", s, html, bytes.TrimSpace(buf.Bytes()))
		}
	}
}

// TestFromResult maps the engine's reasons to PostHog's codes.
func TestFromResult(t *testing.T) {
	defs, err := eval.Parse([]byte(`{"flags":[{"id":9,"version":4,"key":"f","active":true,"filters":{"groups":[{"rollout_percentage":100}],"payloads":{"true":"1"}}}]}`))
	if err != nil {
		t.Fatal(err)
	}
	f, _ := defs.Flag("f")
	cases := []struct {
		r    eval.Result
		code string
		cond int
	}{
		{eval.Result{Key: "f", Enabled: true, Reason: eval.ReasonConditionMatch, Condition: 2, Payload: &eval.Payload{Raw: json.RawMessage(`"1"`)}}, "condition_match", 2},
		{eval.Result{Key: "f", Reason: eval.ReasonNoConditionMatch, Condition: -1}, "no_condition_match", -1},
		{eval.Result{Key: "f", Reason: eval.ReasonOutOfRollout, Condition: 0}, "out_of_rollout_bound", 0},
		{eval.Result{Key: "f", Reason: eval.ReasonDisabled, Condition: -1}, "flag_disabled", -1},
		{eval.Result{Key: "f", Reason: eval.ReasonNoGroup, Condition: -1}, "no_group_type", -1},
		{eval.Result{Key: "f", Reason: eval.ReasonKilled, Condition: -1}, "flag_disabled", -1},
		{eval.Result{Key: "f", Enabled: true, Variant: "v", Reason: eval.ReasonOverride, Condition: -1}, ReasonEdgeOverride, -1},
		{eval.Result{Key: "f", Reason: eval.ReasonStaticCohort, Condition: -1}, ReasonEdgeInconclusive, -1},
	}
	for _, c := range cases {
		got := FromResult(f, c.r)
		if got.Reason != c.code || got.ConditionIndex != c.cond || got.ID != 9 || got.Version != 4 || got.Description == "" {
			t.Errorf("%s: %+v", c.r.Reason, got)
		}
		if (got.Payload != nil) != (c.r.Enabled && c.r.Payload != nil) {
			t.Errorf("%s: payload %s", c.r.Reason, got.Payload)
		}
	}
	if got := FromResult(f, cases[0].r); got.Description != "Matched condition set 3" {
		t.Errorf("description %q", got.Description)
	}
}

package caddymodule

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/flagsapi"
	"github.com/flagsplit/flagsplit/posthog"
)

// recordedRequest is a flags request posthog-js sent in the browser end to
// end test (e2e/browser), with the answer posthog_flags gave it there.
type recordedRequest struct {
	PostHogJS  string            `json:"posthog_js"`
	URL        string            `json:"url"`
	Method     string            `json:"method"`
	Headers    map[string]string `json:"headers"`
	BodyBase64 string            `json:"body_base64"`
	Response   string            `json:"response"`
	name       string
	body       []byte
}

func recordedRequests(t testing.TB) []recordedRequest {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("..", "flagsapi", "testdata", "posthogjs", "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no recorded posthog-js requests: %v", err)
	}
	var out []recordedRequest
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var rr recordedRequest
		if err := json.Unmarshal(data, &rr); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if rr.body, err = base64.StdEncoding.DecodeString(rr.BodyBase64); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		rr.name = filepath.Base(f)
		out = append(out, rr)
	}
	return out
}

// e2eDefinitions are the definitions the recorded requests were answered
// with.
func e2eDefinitions(t testing.TB) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "e2e", "browser", "flags.json"))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func newTestPostHogFlags(t testing.TB, app *testApp) *PostHogFlags {
	t.Helper()
	h := new(PostHogFlags)
	if err := h.setup(app.App, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	return h
}

// flagsRequest builds a request the way Caddy's server hands it to the
// handler chain, after handle_path stripped the proxy's prefix.
func flagsRequest(method, target, contentType string, body []byte) *http.Request {
	r := httptest.NewRequest(method, "http://shop.example.com"+target, bytes.NewReader(body))
	if contentType != "" {
		r.Header.Set("Content-Type", contentType)
	}
	r.RemoteAddr = "203.0.113.9:5555"
	return caddyhttp.PrepareRequest(r, caddy.NewReplacer(), httptest.NewRecorder(), benchServer)
}

// serveFlags runs a request through the handler; next fails the test unless
// passOK.
func serveFlags(t *testing.T, h *PostHogFlags, r *http.Request) *httptest.ResponseRecorder {
	t.Helper()
	w := httptest.NewRecorder()
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error {
		t.Errorf("%s %s went to the next handler", r.Method, r.URL)
		return nil
	})
	if err := h.ServeHTTP(w, r, next); err != nil {
		t.Fatalf("ServeHTTP: %v", err)
	}
	return w
}

// v2Answer is the /flags?v=2 shape as posthog-js reads it.
type v2Answer struct {
	Flags map[string]struct {
		Key     string  `json:"key"`
		Enabled bool    `json:"enabled"`
		Variant *string `json:"variant"`
		Failed  bool    `json:"failed"`
		Reason  struct {
			Code           string `json:"code"`
			ConditionIndex *int   `json:"condition_index"`
			Description    string `json:"description"`
		} `json:"reason"`
		Metadata struct {
			ID      int64           `json:"id"`
			Version int64           `json:"version"`
			Payload json.RawMessage `json:"payload"`
		} `json:"metadata"`
	} `json:"flags"`
	ErrorsWhileComputingFlags bool   `json:"errorsWhileComputingFlags"`
	RequestID                 string `json:"requestId"`
	EvaluatedAt               int64  `json:"evaluatedAt"`
}

// values is what posthog-js makes of the v2 shape: variant ?? enabled.
func (a v2Answer) values() map[string]any {
	out := map[string]any{}
	for k, f := range a.Flags {
		if f.Variant != nil {
			out[k] = *f.Variant
		} else {
			out[k] = f.Enabled
		}
	}
	return out
}

type legacyAnswer struct {
	FeatureFlags              map[string]any             `json:"featureFlags"`
	FeatureFlagPayloads       map[string]json.RawMessage `json:"featureFlagPayloads"`
	ErrorsWhileComputingFlags bool                       `json:"errorsWhileComputingFlags"`
}

// recordedSubject is who a recorded request is for, read from its JSON
// independently of the handler's decoder.
func recordedSubject(t *testing.T, rr recordedRequest) (eval.Subject, string) {
	t.Helper()
	doc, _, err := flagsapiDecodeForTest(rr)
	if err != nil {
		t.Fatalf("%s: %v", rr.name, err)
	}
	var body struct {
		DistinctID       string                `json:"distinct_id"`
		DeviceID         string                `json:"$device_id"`
		PersonProperties map[string]eval.Value `json:"person_properties"`
	}
	if err := json.Unmarshal(doc, &body); err != nil {
		t.Fatalf("%s: %v", rr.name, err)
	}
	return eval.Subject{DistinctID: body.DistinctID, DeviceID: body.DeviceID, Person: eval.PropertiesFromMap(body.PersonProperties)}, body.DistinctID
}

func flagsapiDecodeForTest(rr recordedRequest) ([]byte, flagsapi.Encoding, error) {
	r := httptest.NewRequest(rr.Method, "http://x"+rr.URL, nil)
	req, enc, err := flagsapi.Decode(r.URL.Query(), rr.Headers["content-type"], rr.body)
	return req.JSON, enc, err
}

// TestPostHogFlagsRecordedRequests answers every recorded posthog-js request
// (each body encoding it sends) in both response versions, and checks the
// answer against the engine's own evaluation for the subject in the body,
// and against what the end-to-end run answered (which the browser there
// matched with the upstream's headers).
func TestPostHogFlagsRecordedRequests(t *testing.T) {
	app := newTestApp(t, e2eDefinitions(t), 1000)
	h := newTestPostHogFlags(t, app)
	defs := app.engine.definitions()
	for _, rr := range recordedRequests(t) {
		subject, id := recordedSubject(t, rr)
		if id == "" {
			t.Fatalf("%s: no distinct_id", rr.name)
		}
		want := map[string]any{}
		for _, f := range defs.Flags() {
			res := defs.Evaluate(f.Key, &subject)
			want[f.Key] = res.JSONValue()
		}
		// As recorded, the e2e PostHog stand-in filled in the flag the
		// edge cannot decide; here, without a posthog block, it is false.
		var recordedValues map[string]any
		if strings.Contains(rr.URL, "v=3") {
			var la legacyAnswer
			if err := json.Unmarshal([]byte(rr.Response), &la); err != nil {
				t.Fatalf("%s: recorded answer: %v", rr.name, err)
			}
			recordedValues = la.FeatureFlags
		} else {
			var va v2Answer
			if err := json.Unmarshal([]byte(rr.Response), &va); err != nil {
				t.Fatalf("%s: recorded answer: %v", rr.name, err)
			}
			recordedValues = va.values()
		}
		for k, v := range want {
			if k == "e2e-continuity" {
				continue
			}
			if recordedValues[k] != v {
				t.Errorf("%s: recorded %s = %v, the engine says %v", rr.name, k, recordedValues[k], v)
			}
		}

		path, _, _ := strings.Cut(rr.URL, "?")
		for _, target := range []string{rr.URL, path + "?v=2", path + "?v=4", path + "?v=3", path} {
			t.Run(rr.name+" "+target, func(t *testing.T) {
				r := flagsRequest(rr.Method, target, rr.Headers["content-type"], rr.body)
				// The query's compression parameter goes with the body.
				if c := queryParam(rr.URL, "compression"); c != "" {
					q := r.URL.Query()
					q.Set("compression", c)
					r.URL.RawQuery = q.Encode()
				}
				w := serveFlags(t, h, r)
				if w.Code != http.StatusOK || !strings.HasPrefix(w.Header().Get("Content-Type"), "application/json") {
					t.Fatalf("status %d, content type %q: %s", w.Code, w.Header().Get("Content-Type"), w.Body)
				}
				format := flagsapi.FormatFor(strings.HasPrefix(path, "/decide"), queryParam(target, "v"))
				got := map[string]any{}
				errs := false
				switch format {
				case flagsapi.FormatFlagsV2:
					var va v2Answer
					if err := json.Unmarshal(w.Body.Bytes(), &va); err != nil {
						t.Fatalf("answer: %v: %s", err, w.Body)
					}
					got, errs = va.values(), va.ErrorsWhileComputingFlags
					if va.RequestID == "" || va.EvaluatedAt == 0 {
						t.Errorf("no requestId/evaluatedAt: %s", w.Body)
					}
					for k, f := range va.Flags {
						def, _ := defs.Flag(k)
						if f.Key != k || f.Metadata.ID != def.ID || f.Metadata.Version != def.Version {
							t.Errorf("%s: key %q id %d version %d, want id %d version %d", k, f.Key, f.Metadata.ID, f.Metadata.Version, def.ID, def.Version)
						}
						if f.Reason.Code == "" {
							t.Errorf("%s: no reason code", k)
						}
					}
					if c := va.Flags["e2e-continuity"]; c.Reason.Code != flagsapi.ReasonEdgeInconclusive || c.Enabled {
						t.Errorf("e2e-continuity: %+v, want false with %s", c, flagsapi.ReasonEdgeInconclusive)
					}
					if mv := va.Flags["e2e-multivariate"]; mv.Variant != nil && *mv.Variant == "test" {
						if string(mv.Metadata.Payload) != `"{\"headline\": \"<b>New</b> & improved\"}"` {
							t.Errorf("payload %s", mv.Metadata.Payload)
						}
					}
				case flagsapi.FormatLegacy:
					var la legacyAnswer
					if err := json.Unmarshal(w.Body.Bytes(), &la); err != nil {
						t.Fatalf("answer: %v: %s", err, w.Body)
					}
					got, errs = la.FeatureFlags, la.ErrorsWhileComputingFlags
					for k, p := range la.FeatureFlagPayloads {
						if v, _ := got[k]; v == false {
							t.Errorf("payload %s for disabled flag %s", p, k)
						}
					}
				case flagsapi.FormatDecideV2:
					var d struct {
						FeatureFlags map[string]any `json:"featureFlags"`
					}
					if err := json.Unmarshal(w.Body.Bytes(), &d); err != nil {
						t.Fatalf("answer: %v: %s", err, w.Body)
					}
					// Only the enabled flags are listed.
					got, errs = map[string]any{}, true
					for k, v := range want {
						if v == false {
							got[k] = false
						}
					}
					for k, v := range d.FeatureFlags {
						if v == false {
							t.Errorf("decide v2 lists disabled %s", k)
						}
						got[k] = v
					}
				case flagsapi.FormatDecideV1:
					var d struct {
						FeatureFlags []string `json:"featureFlags"`
					}
					if err := json.Unmarshal(w.Body.Bytes(), &d); err != nil {
						t.Fatalf("answer: %v: %s", err, w.Body)
					}
					for k, v := range want {
						if v != false {
							got[k] = v
						}
					}
					enabled := map[string]bool{}
					for _, k := range d.FeatureFlags {
						enabled[k] = true
					}
					for k, v := range want {
						if enabled[k] != (v != false) {
							t.Errorf("decide v1: %s listed %v, value %v", k, enabled[k], v)
						}
					}
					errs = true
				}
				if !errs {
					t.Errorf("errorsWhileComputingFlags not set, though e2e-continuity was not decided")
				}
				if strings.HasPrefix(path, "/decide") && !strings.Contains(w.Body.String(), `"supportedCompression"`) {
					t.Errorf("decide answer without config: %s", w.Body)
				}
				for k, v := range want {
					if format == flagsapi.FormatDecideV1 {
						break
					}
					if g, ok := got[k]; !ok || g != v {
						t.Errorf("%s = %v (present %v), the engine says %v", k, g, ok, v)
					}
				}
			})
		}
	}
}

func queryParam(target, name string) string {
	_, q, _ := strings.Cut(target, "?")
	for _, kv := range strings.Split(q, "&") {
		if k, v, _ := strings.Cut(kv, "="); k == name {
			return v
		}
	}
	return ""
}

// TestPostHogFlagsPassesOn: every other request, and flags requests it must
// not answer, reach the next handler unchanged, body included.
func TestPostHogFlagsPassesOn(t *testing.T) {
	app := newTestApp(t, e2eDefinitions(t), 1000)
	app.PostHog = &PostHogConfig{ProjectAPIKey: "phc_e2e"}
	h := newTestPostHogFlags(t, app)
	cases := []struct {
		name, method, target, body string
	}{
		{"events", http.MethodPost, "/e/?compression=gzip-js", "\x1f\x8b\x08garbage"},
		{"remote config", http.MethodGet, "/array/phc_e2e/config", ""},
		{"remote config script", http.MethodGet, "/array/phc_e2e/config.js", ""},
		{"definitions", http.MethodGet, "/flags/definitions?token=phc_e2e", ""},
		{"flags by GET", http.MethodGet, "/flags/?v=2", ""},
		{"another project", http.MethodPost, "/flags/?v=2", `{"token":"phc_other","distinct_id":"u1"}`},
		{"not JSON", http.MethodPost, "/flags/?v=2", `{"token":`},
		{"not base64", http.MethodPost, "/flags/?v=2&compression=base64", `data=%%%`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			passed := postHogFlagsRequests.WithLabelValues("flags", "passed")
			before := counterValue(t, passed)
			r := flagsRequest(c.method, c.target, "", []byte(c.body))
			called := false
			next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				called = true
				got, err := io.ReadAll(r.Body)
				if err != nil || string(got) != c.body {
					t.Errorf("next got body %q (%v), want %q", got, err, c.body)
				}
				return nil
			})
			if err := h.ServeHTTP(httptest.NewRecorder(), r, next); err != nil {
				t.Fatal(err)
			}
			if !called {
				t.Fatal("not passed on")
			}
			_, isFlags := flagsEndpoint(strings.Split(c.target, "?")[0])
			after := counterValue(t, passed)
			if isFlags && c.method == http.MethodPost && after != before+1 {
				t.Errorf("passed counter %v -> %v", before, after)
			}
		})
	}
}

// TestPostHogFlagsRefusesWhatPostHogRefuses: no distinct id is a 400, as at
// PostHog; a body over the limit is a 413.
func TestPostHogFlagsRefusesWhatPostHogRefuses(t *testing.T) {
	app := newTestApp(t, e2eDefinitions(t), 1000)
	h := newTestPostHogFlags(t, app)
	w := serveFlags(t, h, flagsRequest(http.MethodPost, "/flags/?v=2", "application/json", []byte(`{"token":"phc_e2e"}`)))
	if w.Code != http.StatusBadRequest || !json.Valid(w.Body.Bytes()) {
		t.Errorf("no distinct_id: %d %s", w.Code, w.Body)
	}
	big := append([]byte(`{"distinct_id":"u","x":"`), bytes.Repeat([]byte("a"), flagsapi.MaxBodySize)...)
	err := h.ServeHTTP(httptest.NewRecorder(), flagsRequest(http.MethodPost, "/flags/?v=2", "application/json", big), caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil }))
	var he caddyhttp.HandlerError
	if !errors.As(err, &he) || he.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized body: %v", err)
	}
	// disable_flags asks for no flags, and needs no id.
	w = serveFlags(t, h, flagsRequest(http.MethodPost, "/flags/?v=2", "application/json", []byte(`{"token":"phc_e2e","disable_flags":true}`)))
	if w.Code != http.StatusOK || !strings.HasPrefix(w.Body.String(), `{"flags":{}`) {
		t.Errorf("disable_flags: %d %s", w.Code, w.Body)
	}
}

// TestPostHogFlagsOverridesAsRouting: a kill switch and a forced variant set
// on the app are what the endpoint answers, exactly as the feature_flags
// handler routes the same user.
func TestPostHogFlagsOverridesAsRouting(t *testing.T) {
	app := newTestApp(t, e2eDefinitions(t), 1000)
	h := newTestPostHogFlags(t, app)
	route := newTestHandler(t, app)
	body := []byte(`{"token":"phc_e2e","distinct_id":"user-42","person_properties":{"plan":"pro"}}`)
	for _, o := range []*eval.Override{{Killed: true}, {Variant: "test-2"}, nil} {
		if o != nil {
			if _, err := app.setOverride(context.Background(), "e2e-multivariate", o, nil); err != nil {
				t.Fatal(err)
			}
		} else if _, err := app.setOverride(context.Background(), "e2e-multivariate", nil, nil); err != nil {
			t.Fatal(err)
		}
		w := serveFlags(t, h, flagsRequest(http.MethodPost, "/flags/?v=2", "application/json", body))
		var va v2Answer
		if err := json.Unmarshal(w.Body.Bytes(), &va); err != nil {
			t.Fatal(err)
		}
		r := prepare(&discardWriter{h: http.Header{}}, "user-42")
		st := route.evaluate(r, r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer), false)
		for _, key := range []string{"e2e-boolean", "e2e-multivariate", "e2e-plan"} {
			var browser string
			if f := va.Flags[key]; f.Variant != nil {
				browser = *f.Variant
			} else if f.Enabled {
				browser = "true"
			} else {
				browser = "false"
			}
			if routed := st.results.Value(st.bound.index[key]); browser != routed {
				t.Errorf("override %+v: %s answered %s, routed %s", o, key, browser, routed)
			}
		}
		mv := va.Flags["e2e-multivariate"]
		switch {
		case o != nil && o.Killed && (mv.Enabled || mv.Reason.Code != "flag_disabled"):
			t.Errorf("killed: %+v", mv)
		case o != nil && o.Variant != "" && (mv.Variant == nil || *mv.Variant != "test-2" || mv.Reason.Code != flagsapi.ReasonEdgeOverride):
			t.Errorf("forced variant: %+v", mv)
		}
	}
}

// fakePostHog is a loopback PostHog /flags endpoint that records the calls.
type fakePostHog struct {
	mu     sync.Mutex
	calls  []map[string]any
	xff    []string
	status int
	answer string
}

func (f *fakePostHog) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var doc map[string]any
	_ = json.NewDecoder(r.Body).Decode(&doc)
	f.mu.Lock()
	f.calls = append(f.calls, doc)
	f.xff = append(f.xff, r.Header.Get("X-Forwarded-For"))
	status, answer := f.status, f.answer
	f.mu.Unlock()
	if r.URL.Path != "/flags/" || r.URL.Query().Get("v") != "2" {
		status = http.StatusNotFound
	}
	w.WriteHeader(status)
	_, _ = io.WriteString(w, answer)
}

// TestPostHogFlagsFillsFromPostHog: the flags the edge cannot decide are
// asked of PostHog in one call, for those flags only, with the visitor's
// address; the answers the edge decided are kept whatever PostHog says of
// them; a failed call serves the undecided flags false.
func TestPostHogFlagsFillsFromPostHog(t *testing.T) {
	fake := &fakePostHog{status: http.StatusOK, answer: `{"flags":{
		"e2e-continuity":{"key":"e2e-continuity","enabled":true,"variant":null,"reason":{"code":"condition_match","condition_index":0},"metadata":{"id":104,"version":1,"payload":"{\"from\":\"posthog\"}"}},
		"e2e-boolean":{"key":"e2e-boolean","enabled":true,"variant":"not-local","reason":{"code":"condition_match","condition_index":0},"metadata":{"id":101,"version":2,"payload":null}}
	},"errorsWhileComputingFlags":false,"requestId":"r"}`}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	app := newTestApp(t, e2eDefinitions(t), 1000)
	h := newTestPostHogFlags(t, app)
	h.client = &posthog.Client{Host: srv.URL, Timeout: time.Duration(h.FillTimeout)}

	body := []byte(`{"token":"phc_e2e","distinct_id":"user-7","$anon_distinct_id":"anon-7","person_properties":{"plan":"free"}}`)
	filledCounter := postHogFlagsRequests.WithLabelValues("flags", "filled")
	filledBefore := counterValue(t, filledCounter)
	w := serveFlags(t, h, flagsRequest(http.MethodPost, "/flags/?v=2", "application/json", body))
	var va v2Answer
	if err := json.Unmarshal(w.Body.Bytes(), &va); err != nil {
		t.Fatal(err)
	}
	if len(fake.calls) != 1 {
		t.Fatalf("%d calls to PostHog, want 1", len(fake.calls))
	}
	call := fake.calls[0]
	if keys, _ := json.Marshal(call["flag_keys"]); string(keys) != `["e2e-continuity"]` {
		t.Errorf("flag_keys %s", keys)
	}
	if call["distinct_id"] != "user-7" || call["$anon_distinct_id"] != "anon-7" {
		t.Errorf("forwarded body %v", call)
	}
	if fake.xff[0] != "203.0.113.9" {
		t.Errorf("X-Forwarded-For %q", fake.xff[0])
	}
	c := va.Flags["e2e-continuity"]
	if !c.Enabled || c.Reason.Code != "condition_match" || string(c.Metadata.Payload) != `"{\"from\":\"posthog\"}"` {
		t.Errorf("filled flag: %+v", c)
	}
	defs := app.engine.definitions()
	subject := eval.Subject{DistinctID: "user-7", Person: eval.Properties{{Key: "plan", Value: eval.String("free")}}}
	if local := defs.Evaluate("e2e-boolean", &subject); va.values()["e2e-boolean"] != local.JSONValue() {
		t.Errorf("e2e-boolean = %v, the edge decided %v", va.values()["e2e-boolean"], local.JSONValue())
	}
	if va.ErrorsWhileComputingFlags {
		t.Error("errorsWhileComputingFlags set though every flag was answered")
	}
	if got := counterValue(t, filledCounter); got != filledBefore+1 {
		t.Errorf("filled counter %v -> %v", filledBefore, got)
	}

	// PostHog fails: the flag is false and marked, the rest still answered.
	fake.mu.Lock()
	fake.status = http.StatusInternalServerError
	fake.mu.Unlock()
	w = serveFlags(t, h, flagsRequest(http.MethodPost, "/flags/?v=2", "application/json", body))
	va = v2Answer{}
	if err := json.Unmarshal(w.Body.Bytes(), &va); err != nil {
		t.Fatal(err)
	}
	if c := va.Flags["e2e-continuity"]; c.Enabled || c.Reason.Code != flagsapi.ReasonEdgeInconclusive || !va.ErrorsWhileComputingFlags {
		t.Errorf("after a failed fill: %+v errors=%v", c, va.ErrorsWhileComputingFlags)
	}
	if len(va.Flags) != 4 {
		t.Errorf("%d flags answered, want 4", len(va.Flags))
	}
}

// TestBootstrapPlaceholder: {feature_flags.bootstrap} is posthog-js's
// bootstrap object for the request, with the values the request is routed
// by, and safe inside a <script> element.
func TestBootstrapPlaceholder(t *testing.T) {
	defs := []byte(`{"flags":[
		{"id":1,"key":"on","active":true,"filters":{"groups":[{"rollout_percentage":100}],"payloads":{"true":"{\"html\":\"</script><script>alert(1)</script>\"}"}}},
		{"id":2,"key":"mv</script>","active":true,"filters":{"groups":[{"rollout_percentage":100}],"multivariate":{"variants":[{"key":"a&b\u2028","rollout_percentage":100}]}}},
		{"id":3,"key":"off","active":false,"filters":{"groups":[{"rollout_percentage":100}]}},
		{"id":4,"key":"needs-plan","active":true,"filters":{"groups":[{"properties":[{"key":"tier","value":["x"]}]}]}}
	]}`)
	app := newTestApp(t, defs, 1000)
	h := newTestHandler(t, app)
	for _, tc := range []struct {
		name       string
		setup      func(r *http.Request)
		identified bool
	}{
		{"header id", func(r *http.Request) {}, true},
		{"assigned id", func(r *http.Request) { r.Header.Del("X-POSTHOG-DISTINCT-ID") }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := prepare(&discardWriter{h: http.Header{}}, "user-<1>")
			tc.setup(r)
			repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
			st := h.evaluate(r, repl, false)
			out := repl.ReplaceAll("{feature_flags.bootstrap}", "")
			for _, bad := range []string{"<", ">", "&", "\u2028"} {
				if strings.Contains(out, bad) {
					t.Errorf("%q in %s", bad, out)
				}
			}
			var b struct {
				DistinctID          string                     `json:"distinctID"`
				IsIdentifiedID      bool                       `json:"isIdentifiedID"`
				FeatureFlags        map[string]any             `json:"featureFlags"`
				FeatureFlagPayloads map[string]json.RawMessage `json:"featureFlagPayloads"`
			}
			if err := json.Unmarshal([]byte(out), &b); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			if b.DistinctID != st.identity.DistinctID || b.IsIdentifiedID != tc.identified {
				t.Errorf("identity %q/%v, want %q/%v", b.DistinctID, b.IsIdentifiedID, st.identity.DistinctID, tc.identified)
			}
			want := map[string]any{"on": true, "mv</script>": "a&b\u2028", "off": false, "needs-plan": false}
			for k, v := range want {
				if b.FeatureFlags[k] != v {
					t.Errorf("%s = %v, want %v", k, b.FeatureFlags[k], v)
				}
				if routed := st.results.Value(st.bound.index[k]); routed != strings.Trim(jsonString(v), `"`) {
					t.Errorf("%s routed %s, bootstrap %v", k, routed, v)
				}
			}
			var payload string
			if err := json.Unmarshal(b.FeatureFlagPayloads["on"], &payload); err != nil || payload != `{"html":"</script><script>alert(1)</script>"}` {
				t.Errorf("payload %s (%v)", b.FeatureFlagPayloads["on"], err)
			}
			if len(b.FeatureFlagPayloads) != 1 {
				t.Errorf("payloads %v", b.FeatureFlagPayloads)
			}
		})
	}
}

func jsonString(v any) string {
	if s, ok := v.(string); ok {
		return s
	}
	b, _ := json.Marshal(v)
	return string(b)
}

// TestPostHogFlagsBeforeDefinitions: until definitions are in force the edge
// knows no flag, and PostHog answers.
func TestPostHogFlagsBeforeDefinitions(t *testing.T) {
	app := newTestApp(t, e2eDefinitions(t), 1000)
	app.engine = newEngine(1000, app.clock.Now)
	h := newTestPostHogFlags(t, app)
	body := `{"token":"phc_e2e","distinct_id":"u1"}`
	called := false
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		got, _ := io.ReadAll(r.Body)
		called = string(got) == body
		return nil
	})
	if err := h.ServeHTTP(httptest.NewRecorder(), flagsRequest(http.MethodPost, "/flags/?v=2", "application/json", []byte(body)), next); err != nil {
		t.Fatal(err)
	}
	if !called {
		t.Error("not passed on with its body before definitions")
	}
	// Definitions with no flags at all are an answer: no flags.
	if _, err := app.engine.install(definitionsSource{kind: sourceFile, location: "test"}, []byte(`{"flags":[]}`)); err != nil {
		t.Fatal(err)
	}
	w := serveFlags(t, h, flagsRequest(http.MethodPost, "/flags/?v=2", "application/json", []byte(body)))
	if !strings.HasPrefix(w.Body.String(), `{"flags":{},"errorsWhileComputingFlags":false`) {
		t.Errorf("empty definitions: %s", w.Body)
	}
}

// TestPostHogFlagsFillTimeout: a PostHog that never answers holds the
// request no longer than fill_timeout; the undecided flag is served false
// and the rest as decided.
func TestPostHogFlagsFillTimeout(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	defer srv.Close()
	defer close(release)
	app := newTestApp(t, e2eDefinitions(t), 1000)
	h := &PostHogFlags{FillTimeout: caddy.Duration(20 * time.Millisecond)}
	if err := h.setup(app.App, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	h.client = &posthog.Client{Host: srv.URL, Timeout: time.Duration(h.FillTimeout)}
	failed := postHogFlagsRequests.WithLabelValues("flags", "fill_failed")
	before := counterValue(t, failed)
	w := serveFlags(t, h, flagsRequest(http.MethodPost, "/flags/?v=2", "application/json", []byte(`{"token":"phc_e2e","distinct_id":"u9","person_properties":{"plan":"pro"}}`)))
	var va v2Answer
	if err := json.Unmarshal(w.Body.Bytes(), &va); err != nil {
		t.Fatal(err)
	}
	if c := va.Flags["e2e-continuity"]; c.Enabled || c.Reason.Code != flagsapi.ReasonEdgeInconclusive || !va.ErrorsWhileComputingFlags || len(va.Flags) != 4 {
		t.Errorf("after a fill-in that timed out: %s", w.Body)
	}
	if got := counterValue(t, failed); got != before+1 {
		t.Errorf("fill_failed counter %v -> %v", before, got)
	}
}

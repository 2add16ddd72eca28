package caddymodule

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dunglas/httpsfv"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/flagsplit/flagsplit/proxy"
)

// rawGet sends one hand-written HTTP/1.1 request to addr (header lines as
// given, byte for byte: names a client library would canonicalise or
// refuse, values that are not UTF-8) and returns what the echoing upstream
// saw.
func rawGet(t *testing.T, addr string, headerLines ...string) (*http.Response, echo) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET / HTTP/1.1\r\nHost: " + addr + "\r\n" + strings.Join(headerLines, "\r\n")
	if len(headerLines) > 0 {
		req += "\r\n"
	}
	req += "\r\n"
	if _, err := conn.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var e echo
	if resp.StatusCode == http.StatusOK {
		if err := json.NewDecoder(resp.Body).Decode(&e); err != nil {
			t.Fatal(err)
		}
	}
	return resp, e
}

// flagsplitHeadersSeen lists the headers a backend received that it could
// read as one of flagsplit's (under CGI/WSGI folding), with their values.
func flagsplitHeadersSeen(h http.Header) map[string][]string {
	out := map[string][]string{}
	for name, v := range h {
		if proxy.IsFlagsplitHeader(name) {
			out[name] = v
		}
	}
	return out
}

// loadHostileSite runs :9080 with the feature_flags handler in front of a
// loopback upstream that echoes the headers it received, with extra global
// server options. The flag new-checkout-flow is false for everyone, so a
// client's "true" that reaches the backend is visible.
func loadHostileSite(t *testing.T, serverOptions, handlerOptions string) *upstream {
	t.Helper()
	defsFile := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, defsFile, []byte(`{"flags": [
		{"key": "new-checkout-flow", "active": true, "filters": {"groups": [{"rollout_percentage": 0}]}},
		{"key": "homepage-hero", "active": true, "filters": {"groups": [{"rollout_percentage": 100}],
			"multivariate": {"variants": [{"key": "variant-b", "rollout_percentage": 100}]}}}]}`))
	up := newUpstream(t, "old")
	load(t, fmt.Sprintf(`{
	%s
	servers {
		%s
	}
	feature_flags {
		definitions %s
	}
}
:9080 {
	feature_flags {
		%s
	}
	reverse_proxy %s
}`, globals(t.TempDir()), serverOptions, defsFile, handlerOptions, up.dial()))
	return up
}

// wantOurHeaders checks that the backend saw exactly flagsplit's headers.
func wantOurHeaders(t *testing.T, what string, e echo, id string) {
	t.Helper()
	want := map[string][]string{
		"X-Posthog-Distinct-Id":            {id},
		"X-Feature-Flag-New-Checkout-Flow": {"false"},
		"X-Feature-Flag-Homepage-Hero":     {"variant-b"},
	}
	if got := flagsplitHeadersSeen(e.Headers); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("%s: the backend saw %v, want %v", what, got, want)
	}
}

// Row 2 of the hostile-input list: a client's Connection header naming
// flagsplit's headers made reverse_proxy drop them as hop-by-hop.
func TestConnectionHeaderCannotRemoveOurHeaders(t *testing.T) {
	loadHostileSite(t, "", "")
	_, e := rawGet(t, siteA, "X-POSTHOG-DISTINCT-ID: user-1",
		"Connection: keep-alive, X-Feature-Flag-New-Checkout-Flow, X-PostHog-Distinct-Id, X-Custom",
		"Connection: x_feature_flag_homepage_hero",
		"X-Custom: dropped as hop-by-hop", "X-Other: kept")
	wantOurHeaders(t, "Connection naming our headers", e, "user-1")
	if e.Headers.Get("X-Custom") != "" || e.Headers.Get("X-Other") != "kept" {
		t.Errorf("the client's other Connection tokens were not honoured: %v", e.Headers)
	}
}

// Row 3: with expected_underscore_headers, a client's X_Feature_Flag_<key>
// reached the backend beside ours (a WSGI backend reads both as
// HTTP_X_FEATURE_FLAG_<KEY>), alone once trick 2 removed ours.
func TestUnderscoreSpellingsOfOurHeadersAreStripped(t *testing.T) {
	// With x_* Caddy also drops every hyphenated X-* header the client
	// sends (the "hyphenated variants" of the allowed names), the
	// X-POSTHOG-DISTINCT-ID identity header among them: the id comes from a
	// cookie here.
	loadHostileSite(t, "expected_underscore_headers x_*", "distinct_id cookie uid")
	_, e := rawGet(t, siteA, "Cookie: uid=user-1",
		"X_Feature_Flag_New_Checkout_Flow: true", "x_feature_flag_homepage_hero: control",
		"X_POSTHOG_DISTINCT_ID: someone-else", "X_Feature_Flags: new-checkout-flow", "X_Other: kept")
	wantOurHeaders(t, "underscore spellings", e, "user-1")
	if e.Headers.Get("X_other") == "" {
		t.Errorf("an allowed underscore header of the client's own was removed: %v", e.Headers)
	}
	_, e = rawGet(t, siteA, "Cookie: uid=user-1", "X_Feature_Flag_New_Checkout_Flow: true",
		"Connection: X-Feature-Flag-New-Checkout-Flow")
	wantOurHeaders(t, "underscore spelling and Connection", e, "user-1")
}

// Row 15: an id header that is not UTF-8, or empty, reached the backend as
// is and was not counted as malformed.
func TestInvalidIdentityHeadersAreSkippedAndCounted(t *testing.T) {
	loadHostileSite(t, "", "assign_cookie off\n\t\tdistinct_id header X-POSTHOG-DISTINCT-ID\n\t\tdistinct_id header X-User")
	for _, bad := range []string{"X-POSTHOG-DISTINCT-ID: user-\xff\xfe", "X-POSTHOG-DISTINCT-ID: ", "X-POSTHOG-DISTINCT-ID: " + strings.Repeat("a", 201)} {
		before := metricSum(t, "caddy_feature_flags_malformed_identity_total", map[string]string{"source": "header"})
		_, e := rawGet(t, siteA, bad, "X-User: fallback-user")
		wantOurHeaders(t, fmt.Sprintf("%q", bad), e, "fallback-user")
		if after := metricSum(t, "caddy_feature_flags_malformed_identity_total", map[string]string{"source": "header"}); after != before+1 {
			t.Errorf("%q: malformed_identity_total went from %v to %v", bad, before, after)
		}
	}
}

// The dictionary form carries the same values as the per-flag headers, in
// one header that httpsfv (an independent RFC 8941/9651 parser) reads; off
// sends only the distinct id, and routing still works in both.
func TestHeaderFormsThroughCaddy(t *testing.T) {
	defsFile := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, defsFile, []byte(`{"flags": [
		{"key": "new-checkout-flow", "active": true, "filters": {"groups": [{"rollout_percentage": 100}]}},
		{"key": "Beta", "active": true, "filters": {"groups": [{"rollout_percentage": 0}]}},
		{"key": "homepage-hero", "active": true, "filters": {"groups": [{"rollout_percentage": 100}],
			"multivariate": {"variants": [{"key": "café \"b\"", "rollout_percentage": 100}]}}}]}`))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	for _, form := range []string{"per_flag", "dictionary", "off"} {
		t.Run(form, func(t *testing.T) {
			load(t, fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
	}
}
:9080 {
	feature_flags {
		headers %s
	}
	reverse_proxy %s %s {
		lb_policy feature_flag new-checkout-flow {
			true %s
			default %s
		}
	}
}`, globals(t.TempDir()), defsFile, form, old.dial(), nu.dial(), nu.dial(), old.dial()))
			_, e := rawGet(t, siteA, "X-POSTHOG-DISTINCT-ID: user-1", "X-Feature-Flags: beta", "X-Feature-Flag-Beta: true")
			if e.Upstream != "new" {
				t.Errorf("routed to %q", e.Upstream)
			}
			got := flagsplitHeadersSeen(e.Headers)
			want := map[string][]string{"X-Posthog-Distinct-Id": {"user-1"}}
			switch form {
			case "per_flag":
				want["X-Feature-Flag-New-Checkout-Flow"] = []string{"true"}
				want["X-Feature-Flag-Beta"] = []string{"false"}
				want["X-Feature-Flag-Homepage-Hero"] = []string{`café "b"`}
			case "dictionary":
				want["X-Feature-Flags"] = []string{`new-checkout-flow, *42eta=?0, homepage-hero=%"caf%c3%a9 %22b%22"`}
				if vals := e.Headers.Values("X-Feature-Flags"); len(vals) == 1 {
					d, err := httpsfv.UnmarshalDictionary(vals)
					if err != nil {
						t.Fatalf("httpsfv: %v", err)
					}
					hero, _ := d.Get("homepage-hero")
					beta, _ := d.Get("*42eta")
					if hero.(httpsfv.Item).Value != httpsfv.DisplayString(`café "b"`) || beta.(httpsfv.Item).Value != false {
						t.Errorf("parsed %v, %v", hero, beta)
					}
				}
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("the backend saw %v, want %v", got, want)
			}
		})
	}
}

// serveOnce sends one request through h and returns the response recorder
// and the headers the next handler (the upstream's side) saw.
func serveOnce(t *testing.T, h *Handler, prep func(r *http.Request)) (*httptest.ResponseRecorder, http.Header) {
	t.Helper()
	w := httptest.NewRecorder()
	r := httptest.NewRequest(http.MethodGet, "http://shop.example.com/", nil)
	prep(r)
	r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), w, benchServer)
	var seen http.Header
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		seen = r.Header.Clone()
		return nil
	})
	if err := h.ServeHTTP(w, r, next); err != nil {
		t.Fatal(err)
	}
	return w, seen
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// Row 8: a posthog-js cookie flagsplit cannot parse was replaced by a new
// anonymous id, erasing the user's posthog-js identity.
func TestUnreadablePostHogCookieIsNeverOverwritten(t *testing.T) {
	app := newTestApp(t, benchDefinitions(2), 0)
	app.PostHog = &PostHogConfig{ProjectAPIKey: "phc_test"}
	h := &Handler{}
	if err := h.setup(app.App, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	cookieName := proxy.PostHogCookieName("phc_test")
	deep := strings.Repeat(`{"a":`, 70) + "1" + strings.Repeat("}", 70)
	for name, value := range map[string]string{
		"nesting > 64":         url.PathEscape(`{"distinct_id":"real-user","$device_id":"d","props":` + deep + `}`),
		"240-byte distinct_id": url.PathEscape(`{"distinct_id":"` + strings.Repeat("a", 240) + `","$device_id":"d"}`),
	} {
		before := counterValue(t, h.malformed[proxy.SourcePostHogCookie])
		w, seen := serveOnce(t, h, func(r *http.Request) { r.AddCookie(&http.Cookie{Name: cookieName, Value: value}) })
		if sc := w.Result().Cookies(); len(sc) != 0 {
			t.Errorf("%s: the user's cookie was overwritten: %v", name, sc)
		}
		if id := seen.Get("X-PostHog-Distinct-Id"); len(id) != 36 {
			t.Errorf("%s: the request got no id of its own: %q", name, id)
		}
		if after := counterValue(t, h.malformed[proxy.SourcePostHogCookie]); after != before+1 {
			t.Errorf("%s: malformed posthog_cookie went from %v to %v", name, before, after)
		}
		// With another source configured, it is used instead.
		h2 := &Handler{DistinctID: []IdentitySource{{Source: "cookie", Name: "posthog"}, {Source: "header", Name: "X-User"}}}
		if err := h2.setup(app.App, zap.NewNop()); err != nil {
			t.Fatal(err)
		}
		w, seen = serveOnce(t, h2, func(r *http.Request) {
			r.AddCookie(&http.Cookie{Name: cookieName, Value: value})
			r.Header.Set("X-User", "from-header")
		})
		if seen.Get("X-PostHog-Distinct-Id") != "from-header" || len(w.Result().Cookies()) != 0 {
			t.Errorf("%s: next source not used: %q %v", name, seen.Get("X-PostHog-Distinct-Id"), w.Result().Cookies())
		}
	}
	// A visitor without the cookie still gets one.
	if w, _ := serveOnce(t, h, func(*http.Request) {}); len(w.Result().Cookies()) != 1 {
		t.Errorf("a new visitor got no cookie")
	}
}

// observedHandler is a handler of the config (it warns about its headers)
// logging to an observer.
func observedHandler(t *testing.T, app *testApp, h *Handler) *observer.ObservedLogs {
	t.Helper()
	core, logs := observer.New(zap.WarnLevel)
	if err := h.setup(app.App, zap.New(core)); err != nil {
		t.Fatal(err)
	}
	h.sendsHeaders = true
	return logs
}

// Row 10: flags whose headers a backend reads as one silently lost a value.
func TestCollidingFlagKeysGetNoHeaderAndAreReported(t *testing.T) {
	defs := []byte(`{"flags": [
		{"key": "beta", "active": true, "filters": {"groups": [{"rollout_percentage": 100}]}},
		{"key": "Beta", "active": true, "filters": {"groups": [{"rollout_percentage": 0}]}},
		{"key": "dash-key", "active": true, "filters": {"groups": [{"rollout_percentage": 100}]}},
		{"key": "dash_key", "active": true, "filters": {"groups": [{"rollout_percentage": 0}]}},
		{"key": "sp ace", "active": true, "filters": {"groups": [{"rollout_percentage": 100}]}},
		{"key": "sp-ace", "active": true, "filters": {"groups": [{"rollout_percentage": 0}]}},
		{"key": "solo", "active": true, "filters": {"groups": [{"rollout_percentage": 100}]}}]}`)
	app := newTestApp(t, defs, 0)
	h := &Handler{}
	logs := observedHandler(t, app, h)
	for i := 0; i < 3; i++ {
		_, seen := serveOnce(t, h, func(r *http.Request) { r.Header.Set("X-POSTHOG-DISTINCT-ID", "user-1") })
		if got := flagsplitHeadersSeen(seen); fmt.Sprint(got) != fmt.Sprint(map[string][]string{
			"X-Feature-Flag-Solo": {"true"}, "X-Posthog-Distinct-Id": {"user-1"}}) {
			t.Fatalf("headers %v", got)
		}
	}
	warned := logs.FilterMessageSnippet("collide").All()
	if len(warned) != 3 {
		t.Errorf("%d collision warnings, want 3 (one per collision, once): %v", len(warned), warned)
	}
	// The dictionary form carries all of them.
	hd := &Handler{Headers: "dictionary"}
	dlogs := observedHandler(t, app, hd)
	_, seen := serveOnce(t, hd, func(r *http.Request) { r.Header.Set("X-POSTHOG-DISTINCT-ID", "user-1") })
	if got := seen.Get("X-Feature-Flags"); got != "beta, *42eta=?0, dash-key, dash_key=?0, sp*20ace, sp-ace=?0, solo" {
		t.Errorf("dictionary %q", got)
	}
	if dlogs.Len() != 0 {
		t.Errorf("the dictionary form warned: %v", dlogs.All())
	}

	// validate reports them, for a definitions file and for a config.
	dir := t.TempDir()
	file := filepath.Join(dir, "flags.json")
	writeFileAtomically(t, file, defs)
	var out bytes.Buffer
	if err := validateDefinitions(&out, file); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`flags "Beta", "beta" all map to the header x-feature-flag-beta`, `"dash-key", "dash_key"`, `"sp ace", "sp-ace"`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("validate lacks %q:\n%s", want, out.String())
		}
	}
	cfg := filepath.Join(dir, "Caddyfile")
	writeFileAtomically(t, cfg, []byte(fmt.Sprintf("{\n\tfeature_flags {\n\t\tdefinitions %s\n\t}\n}\n:8080 {\n\tfeature_flags\n\trespond ok\n}\n:8081 {\n\tfeature_flags {\n\t\theaders dictionary\n\t}\n\trespond ok\n}\n", file)))
	out.Reset()
	if err := validateConfig(&out, cfg, "", nil); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if n := strings.Count(out.String(), "warning: feature_flags (server srv0): flags"); n != 3 || strings.Contains(out.String(), "srv1") {
		t.Errorf("validate --config: %d collision warnings for srv0 (want 3, none for the dictionary site):\n%s", n, out.String())
	}
}

// Row 13: without a flags line every flag became a request header, enough
// for backends to refuse every request; flagsplit now says so, once.
func TestManyFlagHeadersAreWarnedAboutOnce(t *testing.T) {
	app := newTestApp(t, benchDefinitions(proxy.ManyFlagHeaders+1), 0)
	for _, c := range []struct {
		h    *Handler
		warn bool
	}{
		{&Handler{}, true},
		{&Handler{Flags: []string{"flag-0", "flag-1"}}, false},
		{&Handler{Headers: "dictionary"}, false},
		{&Handler{Headers: "off"}, false},
	} {
		logs := observedHandler(t, app, c.h)
		for i := 0; i < 3; i++ {
			serveOnce(t, c.h, func(r *http.Request) { r.Header.Set("X-POSTHOG-DISTINCT-ID", fmt.Sprint("user-", i)) })
		}
		// New definitions (as live PostHog definitions grow) bind again,
		// without a second warning.
		if _, err := app.engine.install(definitionsSource{kind: sourceFile, location: "test"}, benchDefinitions(proxy.ManyFlagHeaders+5)); err != nil {
			t.Fatal(err)
		}
		serveOnce(t, c.h, func(r *http.Request) { r.Header.Set("X-POSTHOG-DISTINCT-ID", "user-x") })
		got := logs.FilterMessageSnippet("X-Feature-Flag-* headers").All()
		if c.warn && (len(got) != 1 || !strings.Contains(got[0].Message, "`flags`") || !strings.Contains(got[0].Message, "headers dictionary")) {
			t.Errorf("headers %q flags %v: warnings %v, want one pointing to flags and the dictionary form", c.h.Headers, c.h.Flags, got)
		}
		if !c.warn && len(got) != 0 {
			t.Errorf("headers %q flags %v: warned %v", c.h.Headers, c.h.Flags, got)
		}
	}
	// A smaller set grown past the threshold by live definitions warns then.
	small := newTestApp(t, benchDefinitions(3), 0)
	h := &Handler{}
	logs := observedHandler(t, small, h)
	serveOnce(t, h, func(r *http.Request) {})
	if logs.Len() != 0 {
		t.Fatalf("warned for 3 flags: %v", logs.All())
	}
	if _, err := small.engine.install(definitionsSource{kind: sourceFile, location: "test"}, benchDefinitions(proxy.ManyFlagHeaders+1)); err != nil {
		t.Fatal(err)
	}
	serveOnce(t, h, func(r *http.Request) {})
	if logs.FilterMessageSnippet("X-Feature-Flag-* headers").Len() != 1 {
		t.Errorf("growing definitions did not warn: %v", logs.All())
	}
}

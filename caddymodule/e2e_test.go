package caddymodule

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// End-to-end tests: a real Caddy (caddytest runs one in this process, admin on
// localhost:2999), real upstream servers on loopback, requests over TCP. Tests in
// this package share that Caddy, so none of them runs in parallel.

// upstream is a loopback HTTP server that answers with its name and the request
// headers it received.
type upstream struct {
	name string
	srv  *httptest.Server
	hits atomic.Int64
}

type echo struct {
	Upstream string      `json:"upstream"`
	Headers  http.Header `json:"headers"`
}

func newUpstream(t *testing.T, name string) *upstream {
	t.Helper()
	u := &upstream{name: name}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.hits.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(echo{Upstream: name, Headers: r.Header})
	}))
	t.Cleanup(u.srv.Close)
	return u
}

func (u *upstream) dial() string { return u.srv.Listener.Addr().String() }

// client talks to the test Caddy without a cookie jar, so each test controls
// exactly which cookies a request carries.
var client = &http.Client{Transport: caddytest.CreateTestingTransport(), Timeout: 10 * time.Second}

func get(t testing.TB, rawURL string, headers map[string]string, cookies ...*http.Cookie) (*http.Response, echo) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, rawURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	for _, c := range cookies {
		req.AddCookie(c)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", rawURL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var e echo
	if resp.StatusCode == http.StatusOK && strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		if err := json.Unmarshal(body, &e); err != nil {
			t.Fatalf("%s: %v: %s", rawURL, err, body)
		}
	} else {
		e.Upstream = string(body)
	}
	return resp, e
}

// vectors loads a consistency vector file: the definitions and id -> expected value.
func vectors(t *testing.T, file string) (flags json.RawMessage, expect map[string]string, ids []string) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "eval", "testdata", "conformance", file))
	if err != nil {
		t.Fatal(err)
	}
	var suites []struct {
		Flags json.RawMessage `json:"flags"`
		Cases []struct {
			DistinctID string `json:"distinct_id"`
			Expect     any    `json:"expect"`
		} `json:"cases"`
	}
	if err := json.Unmarshal(data, &suites); err != nil {
		t.Fatal(err)
	}
	expect = map[string]string{}
	for _, c := range suites[0].Cases {
		expect[c.DistinctID] = fmt.Sprint(c.Expect)
		ids = append(ids, c.DistinctID)
	}
	return suites[0].Flags, expect, ids
}

// mergeFlags combines the flags of several definitions documents.
func mergeFlags(t *testing.T, docs ...json.RawMessage) []byte {
	t.Helper()
	var all []json.RawMessage
	for _, d := range docs {
		var doc struct {
			Flags []json.RawMessage `json:"flags"`
		}
		if err := json.Unmarshal(d, &doc); err != nil {
			t.Fatal(err)
		}
		all = append(all, doc.Flags...)
	}
	out, err := json.Marshal(map[string]any{"flags": all, "group_type_mapping": map[string]string{}, "cohorts": map[string]any{}})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// writeFileAtomically replaces path the way deploy tools do: write aside, rename.
func writeFileAtomically(t testing.TB, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// globals are the global options of every in-process test config: the
// caddytest admin port, plain HTTP, and a storage of the test's own.
func globals(t *testing.T) string {
	return globalsWithStorage(inProcessDir(t))
}

func globalsWithStorage(storage string) string {
	return `
	admin localhost:2999
	http_port 9080
	https_port 9443
	grace_period 1ns
	skip_install_trust
	auto_https off
	storage file_system ` + storage + `
`
}

func TestRoutingFollowsPostHogsHash(t *testing.T) {
	simple, simpleExpect, ids := vectors(t, "consistency_simple.json")
	multi, multiExpect, _ := vectors(t, "consistency_multivariate.json")
	defsFile := filepath.Join(inProcessDir(t), "flags.json")
	writeFileAtomically(t, defsFile, mergeFlags(t, simple, multi))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")

	tester := caddytest.NewTester(t)
	tester.InitServer(fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
	}
}
:9080 {
	feature_flags
	reverse_proxy %s %s {
		lb_policy feature_flag simple-flag {
			true %s
			default %s
		}
	}
}
:9081 {
	feature_flags
	reverse_proxy %s %s {
		lb_policy feature_flag multivariate-flag {
			first-variant %s
			default %s
		}
	}
}`, globals(t), defsFile, old.dial(), nu.dial(), nu.dial(), old.dial(), old.dial(), nu.dial(), nu.dial(), old.dial()), "caddyfile")

	byCookie := func(id string) *http.Cookie {
		state, _ := json.Marshal(map[string]string{"distinct_id": id, "$device_id": "dev-" + id, "$user_state": "identified"})
		return &http.Cookie{Name: "ph_phc_testproject_posthog", Value: url.PathEscape(string(state))}
	}
	newCount := 0
	for _, id := range ids {
		wantUpstream := "old"
		if simpleExpect[id] == "true" {
			wantUpstream = "new"
			newCount++
		}
		_, byHeader := get(t, "http://127.0.0.1:9080/", map[string]string{"X-POSTHOG-DISTINCT-ID": id})
		_, fromCookie := get(t, "http://127.0.0.1:9080/", nil, byCookie(id))
		for how, e := range map[string]echo{"header": byHeader, "posthog-js cookie": fromCookie} {
			if e.Upstream != wantUpstream || e.Headers.Get("X-Feature-Flag-simple-flag") != simpleExpect[id] ||
				e.Headers.Get("X-PostHog-Distinct-Id") != id {
				t.Fatalf("%s by %s: reached %s with flag %q id %q; PostHog says %s", id, how, e.Upstream,
					e.Headers.Get("X-Feature-Flag-simple-flag"), e.Headers.Get("X-PostHog-Distinct-Id"), simpleExpect[id])
			}
		}

		_, mv := get(t, "http://127.0.0.1:9081/", map[string]string{"X-POSTHOG-DISTINCT-ID": id})
		want := multiExpect[id]
		if want == "false" {
			want = "false"
		}
		wantUpstream = "old"
		if want == "first-variant" {
			wantUpstream = "new"
		}
		if mv.Headers.Get("X-Feature-Flag-multivariate-flag") != want || mv.Upstream != wantUpstream {
			t.Fatalf("%s: multivariate %q at %s, PostHog says %q", id, mv.Headers.Get("X-Feature-Flag-multivariate-flag"), mv.Upstream, want)
		}
	}
	// Sanity: the vectors split the population, so both sides were exercised.
	if newCount < 300 || newCount > 600 || old.hits.Load() == 0 || nu.hits.Load() == 0 {
		t.Errorf("%d of %d ids in the 45%% rollout; old %d hits, new %d", newCount, len(ids), old.hits.Load(), nu.hits.Load())
	}
}

func TestClientsCannotChooseTheirVariant(t *testing.T) {
	defsFile := filepath.Join(inProcessDir(t), "flags.json")
	writeFileAtomically(t, defsFile, []byte(`{"flags": [
		{"key": "off-for-all", "active": true, "filters": {"groups": [{"rollout_percentage": 0}]}}]}`))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	tester := caddytest.NewTester(t)
	tester.InitServer(fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
	}
}
:9080 {
	feature_flags
	reverse_proxy %s %s {
		lb_policy feature_flag off-for-all {
			true %s
			default %s
		}
	}
}`, globals(t), defsFile, old.dial(), nu.dial(), nu.dial(), old.dial()), "caddyfile")

	req, _ := http.NewRequest(http.MethodGet, "http://127.0.0.1:9080/", nil)
	req.Header.Set("X-POSTHOG-DISTINCT-ID", "user-1")
	req.Header.Set("X-Feature-Flag-off-for-all", "true")
	req.Header["x-feature-flag-OFF-FOR-ALL"] = []string{"true"}
	req.Header.Set("X-Feature-Flag-not-a-flag", "anything")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var e echo
	if err := json.NewDecoder(resp.Body).Decode(&e); err != nil {
		t.Fatal(err)
	}
	if e.Upstream != "old" {
		t.Errorf("a spoofed header routed the request to %s", e.Upstream)
	}
	if got := e.Headers.Values("X-Feature-Flag-off-for-all"); len(got) != 1 || got[0] != "false" {
		t.Errorf("backend saw X-Feature-Flag-off-for-all = %q, want only the evaluated false", got)
	}
	for name := range e.Headers {
		if strings.EqualFold(name, "X-Feature-Flag-not-a-flag") {
			t.Errorf("client header %s reached the backend", name)
		}
	}
	if nu.hits.Load() != 0 {
		t.Errorf("new upstream received %d requests", nu.hits.Load())
	}
}

func TestAssignedIdentityKeepsItsVariant(t *testing.T) {
	multi, _, _ := vectors(t, "consistency_multivariate.json")
	defsFile := filepath.Join(inProcessDir(t), "flags.json")
	writeFileAtomically(t, defsFile, mergeFlags(t, multi))
	old := newUpstream(t, "old")
	tester := caddytest.NewTester(t)
	tester.InitServer(fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
	}
}
:9080 {
	feature_flags
	reverse_proxy %s
}`, globals(t), defsFile, old.dial()), "caddyfile")

	for i := 0; i < 20; i++ {
		resp, first := get(t, "http://127.0.0.1:9080/", nil)
		var assigned *http.Cookie
		for _, c := range resp.Cookies() {
			if c.Name == "flagsplit_id" {
				assigned = c
			}
		}
		if assigned == nil {
			t.Fatalf("no id assigned: %v", resp.Header)
		}
		id := first.Headers.Get("X-PostHog-Distinct-Id")
		if id != assigned.Value || assigned.MaxAge <= 0 || assigned.HttpOnly {
			t.Fatalf("backend saw %q, cookie %+v", id, assigned)
		}
		variant := first.Headers.Get("X-Feature-Flag-multivariate-flag")
		for j := 0; j < 3; j++ {
			resp, again := get(t, "http://127.0.0.1:9080/", nil, &http.Cookie{Name: assigned.Name, Value: assigned.Value})
			if len(resp.Cookies()) != 0 {
				t.Fatalf("a new cookie was set for a returning visitor: %v", resp.Cookies())
			}
			if again.Headers.Get("X-PostHog-Distinct-Id") != id || again.Headers.Get("X-Feature-Flag-multivariate-flag") != variant {
				t.Fatalf("returning visitor %s changed: id %q variant %q (was %q)", id,
					again.Headers.Get("X-PostHog-Distinct-Id"), again.Headers.Get("X-Feature-Flag-multivariate-flag"), variant)
			}
		}
	}
	// Malformed identities never fail a request: they get an id like anyone new.
	resp, e := get(t, "http://127.0.0.1:9080/", map[string]string{"X-POSTHOG-DISTINCT-ID": strings.Repeat("x", 5000)},
		&http.Cookie{Name: "ph_phc_x_posthog", Value: "%7B%22distinct_id%22%3A"})
	if resp.StatusCode != http.StatusOK || e.Headers.Get("X-PostHog-Distinct-Id") == "" || len(resp.Cookies()) != 1 {
		t.Errorf("malformed identity: status %d, id %q, cookies %v", resp.StatusCode, e.Headers.Get("X-PostHog-Distinct-Id"), resp.Cookies())
	}
}

func rolloutDefs(pct int) []byte {
	return []byte(fmt.Sprintf(`{"flags": [{"key": "ramp", "active": true, "version": %d,
		"filters": {"groups": [{"properties": [], "rollout_percentage": %d}]}}]}`, pct, pct))
}

func TestDefinitionsFileIsWatched(t *testing.T) {
	defsFile := filepath.Join(inProcessDir(t), "flags.json")
	writeFileAtomically(t, defsFile, rolloutDefs(0))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	tester := caddytest.NewTester(t)
	tester.InitServer(fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
		watch_interval 50ms
	}
}
:9080 {
	feature_flags
	reverse_proxy %s %s {
		lb_policy feature_flag ramp {
			true %s
			default %s
		}
	}
}`, globals(t), defsFile, old.dial(), nu.dial(), nu.dial(), old.dial()), "caddyfile")

	// Requests flow from several clients the whole time; none may fail.
	var failures, requests atomic.Int64
	var lastNew atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				req, _ := http.NewRequest(http.MethodGet, "http://127.0.0.1:9080/", nil)
				req.Header.Set("X-POSTHOG-DISTINCT-ID", fmt.Sprintf("user-%d-%d", w, i%50))
				resp, err := client.Do(req)
				requests.Add(1)
				if err != nil {
					failures.Add(1)
					continue
				}
				var e echo
				if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&e) != nil {
					failures.Add(1)
				}
				resp.Body.Close()
				if e.Upstream == "new" {
					lastNew.Store(time.Now().UnixNano())
				}
			}
		}(w)
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				close(stop)
				wg.Wait()
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	allTo := func(want string) func() bool {
		return func() bool {
			for i := 0; i < 20; i++ {
				if _, e := get(t, "http://127.0.0.1:9080/", map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("probe-%d", i)}); e.Upstream != want {
					return false
				}
			}
			return true
		}
	}

	time.Sleep(100 * time.Millisecond)
	if nu.hits.Load() != 0 {
		t.Fatalf("0%% rollout sent %d requests to new", nu.hits.Load())
	}
	writeFileAtomically(t, defsFile, rolloutDefs(100))
	waitFor("the 100% rollout to apply", allTo("new"))

	// A broken file is rejected; the last good definitions keep serving.
	errorsBefore := metricValue(t, "caddy_feature_flags_definitions_errors_total")
	writeFileAtomically(t, defsFile, []byte(`{"flags": [{"key": "ramp", "filters": {"groups": [{"rollout_percentage": "all"`))
	waitFor("the broken file to be reported", func() bool {
		return metricValue(t, "caddy_feature_flags_definitions_errors_total") > errorsBefore
	})
	if !allTo("new")() {
		t.Fatal("a broken definitions file changed routing")
	}
	writeFileAtomically(t, defsFile, []byte(`{"flags": [{"key": "ramp", "active": true, "filters": {"groups": [{"rollout_percentage": "all"}]}}]}`))
	time.Sleep(300 * time.Millisecond)
	if !allTo("new")() {
		t.Fatal("a malformed flag definition changed routing")
	}

	// Back to 0 %: everyone returns to old.
	writeFileAtomically(t, defsFile, rolloutDefs(0))
	waitFor("the rollback to apply", allTo("old"))
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
	if failures.Load() != 0 {
		t.Errorf("%d of %d requests failed while definitions changed", failures.Load(), requests.Load())
	}
	if requests.Load() < 100 {
		t.Errorf("only %d requests were sent", requests.Load())
	}
}

// metricValue reads one unlabelled sample from the admin /metrics endpoint.
func metricValue(t testing.TB, name string) float64 {
	t.Helper()
	return metricSum(t, name, nil)
}

// metricSum adds the samples of a metric whose labels include all of want.
func metricSum(t testing.TB, name string, want map[string]string) float64 {
	t.Helper()
	resp, err := http.Get("http://localhost:2999/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	sum := 0.0
	for _, line := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(line, name) || strings.HasPrefix(line, "#") {
			continue
		}
		rest := line[len(name):]
		if rest == "" || (rest[0] != '{' && rest[0] != ' ') {
			continue
		}
		ok := true
		for k, v := range want {
			if !strings.Contains(rest, fmt.Sprintf(`%s="%s"`, k, v)) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		var v float64
		fields := strings.Fields(rest[strings.LastIndex(rest, "}")+1:])
		if len(fields) > 0 {
			fmt.Sscan(fields[0], &v)
		}
		sum += v
	}
	return sum
}

func TestUnavailableAndUndecidedGoToDefault(t *testing.T) {
	defsFile := filepath.Join(inProcessDir(t), "flags.json")
	writeFileAtomically(t, defsFile, []byte(`{"flags": [
		{"key": "everyone", "active": true, "filters": {"groups": [{"rollout_percentage": 100}]}},
		{"key": "needs-plan", "active": true, "filters": {"groups": [{"properties": [{"key": "plan", "value": "pro"}]}]}}]}`))
	old := newUpstream(t, "old")
	// An address nothing listens on: the "new" side is down.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := l.Addr().String()
	l.Close()

	tester := caddytest.NewTester(t)
	tester.InitServer(fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
	}
}
:9080 {
	feature_flags
	reverse_proxy %s %s {
		lb_policy feature_flag everyone {
			true %s
			default %s
		}
		lb_retries 2
		fail_duration 30s
		max_fails 1
	}
}
:9081 {
	feature_flags {
		person_property plan {header.X-Plan}
	}
	reverse_proxy %s %s {
		lb_policy feature_flag needs-plan {
			true %s
			false %s
			default %s
		}
	}
}`, globals(t), defsFile, old.dial(), down, down, old.dial(), old.dial(), down, down, down, old.dial()), "caddyfile")

	// The flag says "new", new is down: after the failed attempt marks it
	// unhealthy the policy falls back to the default on retry.
	for i := 0; i < 5; i++ {
		resp, e := get(t, "http://127.0.0.1:9080/", map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("u%d", i)})
		if resp.StatusCode != http.StatusOK || e.Upstream != "old" || e.Headers.Get("X-Feature-Flag-everyone") != "true" {
			t.Fatalf("status %d upstream %q flag %q", resp.StatusCode, e.Upstream, e.Headers.Get("X-Feature-Flag-everyone"))
		}
	}
	// Without the plan property the flag cannot be decided: it is false, the
	// request goes to the default (not to false's route), and it is counted.
	before := metricSum(t, "caddy_feature_flags_inconclusive_total", map[string]string{"flag": "needs-plan", "reason": "missing_property"})
	resp, e := get(t, "http://127.0.0.1:9081/", map[string]string{"X-POSTHOG-DISTINCT-ID": "u1"})
	if resp.StatusCode != http.StatusOK || e.Upstream != "old" || e.Headers.Get("X-Feature-Flag-needs-plan") != "false" {
		t.Fatalf("inconclusive: status %d upstream %q flag %q", resp.StatusCode, e.Upstream, e.Headers.Get("X-Feature-Flag-needs-plan"))
	}
	if after := metricSum(t, "caddy_feature_flags_inconclusive_total", map[string]string{"flag": "needs-plan", "reason": "missing_property"}); after != before+1 {
		t.Errorf("inconclusive_total went from %v to %v", before, after)
	}
	if n := metricSum(t, "caddy_feature_flags_requests_total", map[string]string{"flag": "needs-plan", "variant": "false", "code_class": "2xx", "upstream": old.dial()}); n < 1 {
		t.Errorf("requests_total for the routed flag: %v", n)
	}
}

func TestMatchersAndPlaceholders(t *testing.T) {
	multi, multiExpect, ids := vectors(t, "consistency_multivariate.json")
	defsFile := filepath.Join(inProcessDir(t), "flags.json")
	doc := mergeFlags(t, multi, []byte(`{"flags": [{"key": "with-payload", "active": true,
		"filters": {"groups": [{"rollout_percentage": 100}], "payloads": {"true": "{\"color\": \"blue\"}"}}}]}`))
	writeFileAtomically(t, defsFile, doc)
	tester := caddytest.NewTester(t)
	tester.InitServer(fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
	}
}
:9080 {
	feature_flags {
		flags multivariate-flag with-payload
	}
	@second feature_flag multivariate-flag second-variant
	@any feature_flag multivariate-flag
	@cel expression feature_flag('multivariate-flag', 'third-variant', 'fourth-variant')
	header @second X-Matched second
	header @any X-Enabled yes
	header @cel X-CEL yes
	respond "{feature_flags.distinct_id}|{feature_flags.multivariate-flag}|{feature_flags.with-payload.payload}|{feature_flags.unknown-flag}"
}
:9081 {
	@second feature_flag multivariate-flag second-variant
	respond @second "matched without the directive"
	respond "not matched"
}`, globals(t), defsFile), "caddyfile")

	for _, id := range ids[:200] {
		want := multiExpect[id]
		resp, e := get(t, "http://127.0.0.1:9080/", map[string]string{"X-POSTHOG-DISTINCT-ID": id})
		if e.Upstream != fmt.Sprintf(`%s|%s|{"color": "blue"}|false`, id, want) {
			t.Fatalf("%s: placeholders gave %q (want variant %s)", id, e.Upstream, want)
		}
		if (resp.Header.Get("X-Matched") == "second") != (want == "second-variant") ||
			(resp.Header.Get("X-Enabled") == "yes") != (want != "false") ||
			(resp.Header.Get("X-CEL") == "yes") != (want == "third-variant" || want == "fourth-variant") {
			t.Fatalf("%s (%s): matched %q enabled %q cel %q", id, want, resp.Header.Get("X-Matched"), resp.Header.Get("X-Enabled"), resp.Header.Get("X-CEL"))
		}
		_, plain := get(t, "http://127.0.0.1:9081/", map[string]string{"X-POSTHOG-DISTINCT-ID": id})
		if (plain.Upstream == "matched without the directive") != (want == "second-variant") {
			t.Fatalf("%s (%s): site without the directive answered %q", id, want, plain.Upstream)
		}
	}
}

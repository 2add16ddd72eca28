package caddymodule

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flagsplit/flagsplit/posthog/posthogtest"
)

func TestRoutingFollowsPostHogsHash(t *testing.T) {
	simple, simpleExpect, ids := vectors(t, "consistency_simple.json")
	multi, multiExpect, _ := vectors(t, "consistency_multivariate.json")
	defsFile := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, defsFile, mergeFlags(t, simple, multi))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")

	load(t, fmt.Sprintf(`{
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
}`, globals(t.TempDir()), defsFile, old.dial(), nu.dial(), nu.dial(), old.dial(), old.dial(), nu.dial(), nu.dial(), old.dial()))

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
		_, byHeader := get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": id})
		_, fromCookie := get(t, urlA, nil, byCookie(id))
		for how, e := range map[string]echo{"header": byHeader, "posthog-js cookie": fromCookie} {
			if e.Upstream != wantUpstream || e.Headers.Get("X-Feature-Flag-simple-flag") != simpleExpect[id] ||
				e.Headers.Get("X-PostHog-Distinct-Id") != id {
				t.Fatalf("%s by %s: reached %s with flag %q id %q; PostHog says %s", id, how, e.Upstream,
					e.Headers.Get("X-Feature-Flag-simple-flag"), e.Headers.Get("X-PostHog-Distinct-Id"), simpleExpect[id])
			}
		}

		_, mv := get(t, urlB, map[string]string{"X-POSTHOG-DISTINCT-ID": id})
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
	defsFile := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, defsFile, []byte(`{"flags": [
		{"key": "off-for-all", "active": true, "filters": {"groups": [{"rollout_percentage": 0}]}}]}`))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	load(t, fmt.Sprintf(`{
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
}`, globals(t.TempDir()), defsFile, old.dial(), nu.dial(), nu.dial(), old.dial()))

	req, _ := http.NewRequest(http.MethodGet, urlA, nil)
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
	defsFile := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, defsFile, mergeFlags(t, multi))
	old := newUpstream(t, "old")
	load(t, fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
	}
}
:9080 {
	feature_flags
	reverse_proxy %s
}`, globals(t.TempDir()), defsFile, old.dial()))

	for i := 0; i < 20; i++ {
		resp, first := get(t, urlA, nil)
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
			resp, again := get(t, urlA, nil, &http.Cookie{Name: assigned.Name, Value: assigned.Value})
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
	resp, e := get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": strings.Repeat("x", 5000)},
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
	defsFile := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, defsFile, rolloutDefs(0))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	load(t, fmt.Sprintf(`{
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
}`, globals(t.TempDir()), defsFile, old.dial(), nu.dial(), nu.dial(), old.dial()))

	// Requests flow from several clients the whole time; none may fail.
	var failures, requests atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}()
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
				req, _ := http.NewRequest(http.MethodGet, urlA, nil)
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
			}
		}(w)
	}
	allTo := func(want string) func() bool {
		return func() bool {
			for i := 0; i < 20; i++ {
				if _, e := get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("probe-%d", i)}); e.Upstream != want {
					return false
				}
			}
			return true
		}
	}
	// moreRequests waits until the clients have sent n more requests.
	moreRequests := func(n int64) {
		target := requests.Load() + n
		eventually(t, 10*time.Second, "the clients' requests", func() bool { return requests.Load() >= target })
	}
	errorsCounted := func(before float64) func() bool {
		return func() bool { return metricValue(t, "caddy_feature_flags_definitions_errors_total") > before }
	}

	moreRequests(100)
	if nu.hits.Load() != 0 {
		t.Fatalf("0%% rollout sent %d requests to new", nu.hits.Load())
	}
	writeFileAtomically(t, defsFile, rolloutDefs(100))
	eventually(t, 10*time.Second, "the 100% rollout to apply", allTo("new"))

	// A broken file is rejected; the last good definitions keep serving.
	errorsBefore := metricValue(t, "caddy_feature_flags_definitions_errors_total")
	writeFileAtomically(t, defsFile, []byte(`{"flags": [{"key": "ramp", "filters": {"groups": [{"rollout_percentage": "all"`))
	eventually(t, 10*time.Second, "the broken file to be reported", errorsCounted(errorsBefore))
	if !allTo("new")() {
		t.Fatal("a broken definitions file changed routing")
	}
	// So is a well-formed file with a malformed flag.
	errorsBefore = metricValue(t, "caddy_feature_flags_definitions_errors_total")
	writeFileAtomically(t, defsFile, []byte(`{"flags": [{"key": "ramp", "active": true, "filters": {"groups": [{"rollout_percentage": "all"}]}}]}`))
	eventually(t, 10*time.Second, "the malformed flag to be reported", errorsCounted(errorsBefore))
	if !allTo("new")() {
		t.Fatal("a malformed flag definition changed routing")
	}

	// Back to 0 %: everyone returns to old.
	writeFileAtomically(t, defsFile, rolloutDefs(0))
	eventually(t, 10*time.Second, "the rollback to apply", allTo("old"))
	moreRequests(100)
	close(stop)
	wg.Wait()
	if failures.Load() != 0 {
		t.Errorf("%d of %d requests failed while definitions changed", failures.Load(), requests.Load())
	}
}

func TestUnavailableAndUndecidedGoToDefault(t *testing.T) {
	defsFile := filepath.Join(t.TempDir(), "flags.json")
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

	load(t, fmt.Sprintf(`{
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
}`, globals(t.TempDir()), defsFile, old.dial(), down, down, old.dial(), old.dial(), down, down, down, old.dial()))

	// The flag says "new", new is down: after the failed attempt marks it
	// unhealthy the policy falls back to the default on retry.
	for i := 0; i < 5; i++ {
		resp, e := get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("u%d", i)})
		if resp.StatusCode != http.StatusOK || e.Upstream != "old" || e.Headers.Get("X-Feature-Flag-everyone") != "true" {
			t.Fatalf("status %d upstream %q flag %q", resp.StatusCode, e.Upstream, e.Headers.Get("X-Feature-Flag-everyone"))
		}
	}
	// Without the plan property the flag cannot be decided: it is false, the
	// request goes to the default (not to false's route), and it is counted.
	before := metricSum(t, "caddy_feature_flags_inconclusive_total", map[string]string{"flag": "needs-plan", "reason": "missing_property"})
	resp, e := get(t, urlB, map[string]string{"X-POSTHOG-DISTINCT-ID": "u1"})
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
	defsFile := filepath.Join(t.TempDir(), "flags.json")
	doc := mergeFlags(t, multi, []byte(`{"flags": [{"key": "with-payload", "active": true,
		"filters": {"groups": [{"rollout_percentage": 100}], "payloads": {"true": "{\"color\": \"blue\"}"}}}]}`))
	writeFileAtomically(t, defsFile, doc)
	load(t, fmt.Sprintf(`{
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
}`, globals(t.TempDir()), defsFile))

	for _, id := range ids[:200] {
		want := multiExpect[id]
		resp, e := get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": id})
		if e.Upstream != fmt.Sprintf(`%s|%s|{"color": "blue"}|false`, id, want) {
			t.Fatalf("%s: placeholders gave %q (want variant %s)", id, e.Upstream, want)
		}
		if (resp.Header.Get("X-Matched") == "second") != (want == "second-variant") ||
			(resp.Header.Get("X-Enabled") == "yes") != (want != "false") ||
			(resp.Header.Get("X-CEL") == "yes") != (want == "third-variant" || want == "fourth-variant") {
			t.Fatalf("%s (%s): matched %q enabled %q cel %q", id, want, resp.Header.Get("X-Matched"), resp.Header.Get("X-Enabled"), resp.Header.Get("X-CEL"))
		}
		_, plain := get(t, urlB, map[string]string{"X-POSTHOG-DISTINCT-ID": id})
		if (plain.Upstream == "matched without the directive") != (want == "second-variant") {
			t.Fatalf("%s (%s): site without the directive answered %q", id, want, plain.Upstream)
		}
	}
}

// A request whose flag routes it to an upstream that is down falls back to the
// default upstream: it was served what false is served, and everything that
// observes it says so: PostHog's exposure, the routed-request metrics and the
// rollout's arms. Only fallbacks_total remembers the value it had.
func TestAFallbackIsServedAndReportedAsFalse(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, checkoutDefs(100))
	t.Cleanup(ph.Close)
	old := newUpstream(t, "old")
	down := newUpstream(t, "down")
	down.srv.Close() // nothing answers there any more
	storage := t.TempDir()
	load(t, fmt.Sprintf(`{
	%s
	feature_flags {
		posthog {
			host %s
			project_api_key %s
			personal_api_key %s
			events on {
				flush_interval 50ms
			}
		}
		rollout checkout {
			steps 100
			step_duration 1h
		}
	}
}
:9080 {
	feature_flags
	reverse_proxy %s %s {
		lb_policy feature_flag checkout {
			true %s
			default %s
		}
		lb_retries 2
		fail_duration 30s
		max_fails 1
	}
}`, globals(storage), ph.URL, testProjectKey, testPersonalKey, old.dial(), down.dial(), down.dial(), old.dial()))
	eventually(t, 5*time.Second, "the definitions", func() bool { return adminReady(t) })
	served := func(variant string) float64 {
		return metricSum(t, "caddy_feature_flags_requests_total", map[string]string{"flag": "checkout", "variant": variant})
	}
	fellBack := func() float64 {
		return metricSum(t, "caddy_feature_flags_fallbacks_total", map[string]string{"flag": "checkout", "value": "true"})
	}
	falseBefore, trueBefore, fallbacksBefore := served("false"), served("true"), fellBack()

	const users = 20
	for i := 0; i < users; i++ {
		resp, e := get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("fallback-%d", i)})
		if resp.StatusCode != http.StatusOK || e.Upstream != "old" {
			t.Fatalf("request %d: %d from %q", i, resp.StatusCode, e.Upstream)
		}
	}
	eventsDelivered(t, ph, users)
	events, _ := ph.Events()
	for _, e := range events {
		if e.Properties["$feature_flag"] != "checkout" || e.Properties["$feature_flag_response"] != false {
			t.Errorf("%s: reported %v = %v; the user was served the default upstream", e.DistinctID,
				e.Properties["$feature_flag"], e.Properties["$feature_flag_response"])
		}
	}
	if got := served("false") - falseBefore; got != users {
		t.Errorf("requests_total{variant=false} rose by %v, want %d", got, users)
	}
	if got := served("true") - trueBefore; got != 0 {
		t.Errorf("requests_total{variant=true} rose by %v: the old upstream's answers were credited to true", got)
	}
	if got := fellBack() - fallbacksBefore; got != users {
		t.Errorf("fallbacks_total rose by %v, want %d", got, users)
	}
	total := rolloutOf(t, adminURL, "checkout").Total
	if total.Control.Requests != users || total.Treatment.Requests != 0 {
		t.Errorf("the rollout counted %+v, want every fallback as control", total)
	}
}

// A site that routes by a flag without the feature_flags directive is warned
// about at load: nothing observes its responses.
func TestSitesRoutingWithoutTheDirectiveAreWarnedAbout(t *testing.T) {
	defsFile := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, defsFile, checkoutDefs(50))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := t.TempDir()
	load(t, fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
		rollout checkout {
			steps 10 100
		}
	}
}
:9080 {
	@hero feature_flag hero test
	header @hero X-Hero test
	%s
}
:9081 {
	feature_flags
	@hero feature_flag hero test
	header @hero X-Hero test
	%s
}`, globals(storage), defsFile, checkoutProxy(old, nu), checkoutProxy(old, nu)))
	var warned []string
	for _, line := range logOf(t, storage) {
		if msg, _ := line["msg"].(string); line["level"] == "warn" && strings.Contains(msg, "without the feature_flags directive") {
			warned = append(warned, fmt.Sprintf("%v %v %v rollout=%v", line["server"], line["flag"], line["by"], strings.Contains(msg, "a rollout's flag")))
		}
	}
	if len(warned) != 2 || !strings.Contains(warned[0], "checkout lb_policy feature_flag rollout=true") ||
		!strings.Contains(warned[1], "hero feature_flag matcher rollout=false") {
		t.Errorf("warnings: %q", warned)
	}
	for _, w := range warned {
		if strings.Contains(w, "9081") {
			t.Errorf("the site with the directive was warned about: %s", w)
		}
	}
}

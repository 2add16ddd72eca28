package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/posthog/posthogtest"
)

const (
	testProjectKey  = "phc_flagsplit_test"
	testPersonalKey = "phx_flagsplit_test"
)

func checkoutDefs(pct int) []byte {
	return []byte(fmt.Sprintf(`{"flags": [
		{"id": 7, "key": "checkout", "active": true, "version": %d,
		 "filters": {"groups": [{"properties": [], "rollout_percentage": %d}]}},
		{"id": 8, "key": "hero", "active": true, "version": 1,
		 "filters": {"groups": [{"properties": []}], "multivariate": {"variants": [
			{"key": "control", "rollout_percentage": 50}, {"key": "test", "rollout_percentage": 50}]}}},
		{"id": 9, "key": "idle", "active": true, "filters": {"groups": [{}]}}
	], "group_type_mapping": {}, "cohorts": {}}`, pct, pct))
}

// routesTo asks for n users on addr and reports the upstream they all reached,
// or "mixed".
func routesTo(t testing.TB, addr string, n int) string {
	t.Helper()
	seen := ""
	for i := 0; i < n; i++ {
		resp, e := get(t, "http://"+addr+"/", map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("visitor-%d", i)})
		if resp.StatusCode != http.StatusOK {
			return fmt.Sprintf("status %d", resp.StatusCode)
		}
		if seen == "" {
			seen = e.Upstream
		} else if seen != e.Upstream {
			return "mixed"
		}
	}
	return seen
}

func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// checkoutProxy is the reverse_proxy of the checkout test sites: users with
// checkout on reach nu, everyone else old.
func checkoutProxy(old, nu *upstream) string {
	return fmt.Sprintf(`reverse_proxy %s %s {
		lb_policy feature_flag checkout {
			true %s
			default %s
		}
	}`, old.dial(), nu.dial(), nu.dial(), old.dial())
}

// postHogSite is a Caddyfile polling definitions from the PostHog at host and
// routing by checkout between old and new; posthogExtra goes into the posthog
// block, siteExtra into the site.
func postHogSite(storageDir, host string, old, nu *upstream, posthogExtra, siteExtra string) string {
	return fmt.Sprintf(`{
	%s
	feature_flags {
		posthog {
			host %s
			project_api_key %s
			personal_api_key %s
			poll_interval 100ms
			timeout 300ms
			%s
		}
		sync_interval 100ms
	}
}
:9080 {
	feature_flags
	%s
	%s
}`, globalsWithStorage(storageDir), host, testProjectKey, testPersonalKey, posthogExtra, siteExtra,
		checkoutProxy(old, nu))
}

func TestLiveDefinitionsFromPostHog(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, checkoutDefs(0))
	defer ph.Close()
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := inProcessDir(t)
	tester := caddytest.NewTester(t)
	tester.InitServer(postHogSite(storage, ph.URL, old, nu, "", ""), "caddyfile")

	waitUntil(t, 5*time.Second, "the first definitions", func() bool { return routesTo(t, "127.0.0.1:9080", 20) == "old" })
	ph.SetDefinitions(checkoutDefs(100))
	waitUntil(t, 5*time.Second, "the poll to pick up the change", func() bool { return routesTo(t, "127.0.0.1:9080", 20) == "new" })

	// Unchanged definitions are revalidated with the ETag: PostHog answers 304
	// and nothing is downloaded or parsed again.
	served, revalidated := ph.Served(), ph.NotModified()
	time.Sleep(600 * time.Millisecond)
	if ph.Served() != served || ph.NotModified() < revalidated+3 {
		t.Errorf("over 600ms: %d more full answers, %d more 304s", ph.Served()-served, ph.NotModified()-revalidated)
	}
	last := ph.Requests()[len(ph.Requests())-1]
	if last.IfNoneMatch != ph.ETag() || !last.SendCohorts || last.Token != testProjectKey || last.Authorization != "Bearer "+testPersonalKey {
		t.Errorf("poll request %+v", last)
	}

	// PostHog failing or too slow: the last good definitions keep serving.
	errs := metricValue(t, "caddy_feature_flags_definitions_errors_total")
	ph.FailWith(http.StatusInternalServerError)
	waitUntil(t, 5*time.Second, "failures to be counted", func() bool {
		return metricValue(t, "caddy_feature_flags_definitions_errors_total") >= errs+2
	})
	if got := routesTo(t, "127.0.0.1:9080", 20); got != "new" {
		t.Fatalf("while PostHog answers 500: %s", got)
	}
	ph.FailWith(0)
	ph.Stall(time.Second)
	errs = metricValue(t, "caddy_feature_flags_definitions_errors_total")
	waitUntil(t, 5*time.Second, "a timeout to be counted", func() bool {
		return metricValue(t, "caddy_feature_flags_definitions_errors_total") > errs
	})
	if got := routesTo(t, "127.0.0.1:9080", 20); got != "new" {
		t.Fatalf("while PostHog times out: %s", got)
	}
	ph.Stall(0)

	// Over quota: definitions are dropped, every flag serves false.
	ph.FailWith(http.StatusPaymentRequired)
	waitUntil(t, 5*time.Second, "the 402 to drop definitions", func() bool { return routesTo(t, "127.0.0.1:9080", 20) == "old" })
	code, body := adminDo(t, http.MethodGet, "http://localhost:2999/feature_flags/", "")
	if code != http.StatusOK || !strings.Contains(body, "quota limited") || !strings.Contains(body, `"flag_count": 0`) {
		t.Errorf("status after a 402: %d %s", code, body)
	}
	// A wrong key keeps the last good definitions.
	ph.FailWith(0)
	waitUntil(t, 5*time.Second, "recovery", func() bool { return routesTo(t, "127.0.0.1:9080", 20) == "new" })
	ph.FailWith(http.StatusUnauthorized)
	time.Sleep(300 * time.Millisecond)
	if got := routesTo(t, "127.0.0.1:9080", 20); got != "new" {
		t.Fatalf("a 401 changed routing: %s", got)
	}
	ph.FailWith(0)
}

func TestKillSwitchOverrideSurvivesReload(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, checkoutDefs(100))
	defer ph.Close()
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := inProcessDir(t)
	tester := caddytest.NewTester(t)
	tester.InitServer(postHogSite(storage, ph.URL, old, nu, "", ""), "caddyfile")
	waitUntil(t, 5*time.Second, "definitions", func() bool { return routesTo(t, "127.0.0.1:9080", 10) == "new" })

	code, body := adminDo(t, http.MethodPut, "http://localhost:2999/feature_flags/overrides/checkout", `{"killed": true}`)
	if code != http.StatusOK {
		t.Fatalf("PUT override: %d %s", code, body)
	}
	// Effective for the very next request, no waiting.
	if got := routesTo(t, "127.0.0.1:9080", 20); got != "old" {
		t.Fatalf("after the kill switch: %s", got)
	}
	// A config reload (a different config, so Caddy really reloads) keeps it.
	tester.InitServer(postHogSite(storage, ph.URL, old, nu, "", "header X-Reloaded yes"), "caddyfile")
	resp, _ := get(t, "http://127.0.0.1:9080/", map[string]string{"X-POSTHOG-DISTINCT-ID": "x"})
	if resp.Header.Get("X-Reloaded") != "yes" {
		t.Fatal("the new config is not running")
	}
	if got := routesTo(t, "127.0.0.1:9080", 20); got != "old" {
		t.Fatalf("after a reload: %s", got)
	}
	code, body = adminDo(t, http.MethodDelete, "http://localhost:2999/feature_flags/overrides/checkout", "")
	if code != http.StatusOK {
		t.Fatalf("DELETE override: %d %s", code, body)
	}
	if got := routesTo(t, "127.0.0.1:9080", 20); got != "new" {
		t.Fatalf("after clearing the override: %s", got)
	}

	// A rollout cap: exactly the users PostHog's hash puts under 30 % reach new.
	code, body = adminDo(t, http.MethodPut, "http://localhost:2999/feature_flags/overrides/checkout", `{"rollout_percentage": 30}`)
	if code != http.StatusOK {
		t.Fatalf("PUT rollout: %d %s", code, body)
	}
	for i := 0; i < 200; i++ {
		id := fmt.Sprintf("cap-%d", i)
		_, e := get(t, "http://127.0.0.1:9080/", map[string]string{"X-POSTHOG-DISTINCT-ID": id})
		want := "old"
		if hashOf("checkout", id) <= 0.30 {
			want = "new"
		}
		if e.Upstream != want {
			t.Fatalf("%s (hash %v) at 30%%: %s", id, hashOf("checkout", id), e.Upstream)
		}
	}
	adminDo(t, http.MethodDelete, "http://localhost:2999/feature_flags/overrides/checkout", "")
}

func TestAdminAPI(t *testing.T) {
	defsFile := filepath.Join(inProcessDir(t), "flags.json")
	writeFileAtomically(t, defsFile, []byte(`{"flags": [
		{"id": 1, "key": "used", "active": true, "version": 4, "filters": {"groups": [{"properties": [{"key": "plan", "value": "pro"}]}],
			"multivariate": {"variants": [{"key": "a", "rollout_percentage": 50}, {"key": "b", "rollout_percentage": 50}]}}},
		{"id": 2, "key": "unused", "active": true, "filters": {"groups": [{}]}},
		{"id": 3, "key": "continuity", "active": true, "ensure_experience_continuity": true, "filters": {"groups": [{}]}}
	]}`))
	old := newUpstream(t, "old")
	tester := caddytest.NewTester(t)
	tester.InitServer(fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
		stale_after 2s
	}
}
:9080 {
	feature_flags {
		flags used
		person_property plan {header.X-Plan}
	}
	reverse_proxy %s {
		lb_policy feature_flag used {
			a %s
			default %s
		}
	}
}`, globals(t), defsFile, old.dial(), old.dial(), old.dial()), "caddyfile")
	const api = "http://localhost:2999/feature_flags"

	for _, c := range []struct {
		method, path, body string
		status             int
		contains           string
	}{
		{http.MethodPut, "/overrides/nope", `{"killed": true}`, 404, `unknown flag \"nope\"`},
		{http.MethodPut, "/overrides/used", `{"killed": tru`, 400, "JSON object"},
		{http.MethodPut, "/overrides/used", `{"kill": true}`, 400, "unknown field"},
		{http.MethodPut, "/overrides/used", `{}`, 400, "sets nothing"},
		{http.MethodPut, "/overrides/used", `{"rollout_percentage": 101}`, 400, "outside 0..100"},
		{http.MethodPut, "/overrides/used", `{"variant": "c"}`, 400, `no variant \"c\"`},
		{http.MethodDelete, "/overrides/used", "", 404, "has no override"},
		{http.MethodGet, "/evaluate", "", 400, "distinct_id is required"},
		{http.MethodGet, "/evaluate?distinct_id=u&person_properties={", "", 400, "person_properties"},
		{http.MethodPost, "/evaluate?distinct_id=u", "", 405, "not allowed"},
		{http.MethodPost, "/rollouts/used/pause", "", 404, "no rollout"},
		{http.MethodPost, "/rollouts/used/explode", "", 404, "unknown rollout action"},
		{http.MethodGet, "/nothing-here", "", 404, "no such endpoint"},
	} {
		code, body := adminDo(t, c.method, api+c.path, c.body)
		if code != c.status || !strings.Contains(body, c.contains) {
			t.Errorf("%s %s %s: %d %s, want %d with %q", c.method, c.path, c.body, code, body, c.status, c.contains)
		}
	}

	// evaluate answers what the proxy would, with reasons.
	code, body := adminDo(t, http.MethodGet, api+`/evaluate?distinct_id=user-1&person_properties={"plan":"pro"}&flag=used&flag=continuity`, "")
	var ev struct {
		Results []struct {
			Key, Reason string
			Value       any
		}
	}
	if code != 200 || json.Unmarshal([]byte(body), &ev) != nil || len(ev.Results) != 2 {
		t.Fatalf("evaluate: %d %s", code, body)
	}
	if ev.Results[0].Reason != "condition_match" || (ev.Results[0].Value != "a" && ev.Results[0].Value != "b") ||
		ev.Results[1].Reason != "experience_continuity" || ev.Results[1].Value != false {
		t.Errorf("evaluate results %s", body)
	}

	// A variant override shows in evaluate and in routing statistics.
	if code, body := adminDo(t, http.MethodPut, api+"/overrides/used", `{"variant": "a"}`); code != 200 {
		t.Fatalf("variant override: %d %s", code, body)
	}
	time.Sleep(2200 * time.Millisecond) // let never-evaluated flags go stale
	for i := 0; i < 5; i++ {
		get(t, "http://127.0.0.1:9080/", map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("u%d", i), "X-Plan": "pro"})
	}
	code, body = adminDo(t, http.MethodGet, api+"/", "")
	var st adminStatus
	if code != 200 || json.Unmarshal([]byte(body), &st) != nil {
		t.Fatalf("status: %d %s", code, body)
	}
	if !st.Ready || st.Source.Kind != "file" || st.FlagCount != 3 || st.Overrides["used"].Variant != "a" {
		t.Errorf("status header: %s", body)
	}
	byKey := map[string]flagStatus{}
	for _, f := range st.Flags {
		byKey[f.Key] = f
	}
	used := byKey["used"]
	if used.Override == nil || used.Version != 4 || used.Activity.LastEvaluated == nil || used.Activity.Stale ||
		len(used.VariantStats) != 1 || used.VariantStats[0].Variant != "a" || used.VariantStats[0].Requests != 5 {
		t.Errorf("used flag: %+v", used)
	}
	if byKey["continuity"].Local != "never" || byKey["used"].Local != "yes" {
		t.Errorf("local evaluability: %+v %+v", byKey["continuity"], byKey["used"])
	}
	if !byKey["unused"].Activity.Stale || byKey["unused"].Activity.LastEvaluated != nil ||
		strings.Join(st.StaleFlags, ",") != "unused,continuity" {
		t.Errorf("stale flags %v; unused %+v", st.StaleFlags, byKey["unused"].Activity)
	}
	if code, body := adminDo(t, http.MethodGet, api+"/overrides", ""); code != 200 || !strings.Contains(body, `"variant": "a"`) {
		t.Errorf("overrides list: %d %s", code, body)
	}
	if code, body := adminDo(t, http.MethodPost, api+"/refresh", ""); code != 200 || !strings.Contains(body, "not_modified") {
		t.Errorf("refresh: %d %s", code, body)
	}
	adminDo(t, http.MethodDelete, api+"/overrides/used", "")
}

func hashOf(key, id string) float64 { return eval.Hash(key, id, "") }

package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/posthog/posthogtest"
	"go.uber.org/zap"
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
}`, globals(storageDir), host, testProjectKey, testPersonalKey, posthogExtra, siteExtra,
		checkoutProxy(old, nu))
}

func TestLiveDefinitionsFromPostHog(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, checkoutDefs(0))
	t.Cleanup(ph.Close)
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := t.TempDir()
	load(t, postHogSite(storage, ph.URL, old, nu, "", ""))

	eventually(t, 5*time.Second, "the first definitions", func() bool { return routesTo(t, siteA, 20) == "old" })
	ph.SetDefinitions(checkoutDefs(100))
	eventually(t, 5*time.Second, "the poll to pick up the change", func() bool { return routesTo(t, siteA, 20) == "new" })

	// Unchanged definitions are revalidated with the ETag: PostHog answers 304
	// and nothing is downloaded or parsed again.
	served, revalidated := ph.Served(), ph.NotModified()
	eventually(t, 5*time.Second, "three more polls", func() bool { return ph.NotModified() >= revalidated+3 })
	if ph.Served() != served {
		t.Errorf("unchanged definitions were sent in full %d more times", ph.Served()-served)
	}
	last := ph.Requests()[len(ph.Requests())-1]
	if last.IfNoneMatch != ph.ETag() || !last.SendCohorts || last.Token != testProjectKey || last.Authorization != "Bearer "+testPersonalKey {
		t.Errorf("poll request %+v", last)
	}

	// PostHog failing or too slow: the last good definitions keep serving.
	errs := metricValue(t, "caddy_feature_flags_definitions_errors_total")
	ph.FailWith(http.StatusInternalServerError)
	eventually(t, 5*time.Second, "failures to be counted", func() bool {
		return metricValue(t, "caddy_feature_flags_definitions_errors_total") >= errs+2
	})
	if got := routesTo(t, siteA, 20); got != "new" {
		t.Fatalf("while PostHog answers 500: %s", got)
	}
	ph.FailWith(0)
	ph.Stall(time.Second)
	errs = metricValue(t, "caddy_feature_flags_definitions_errors_total")
	eventually(t, 5*time.Second, "a timeout to be counted", func() bool {
		return metricValue(t, "caddy_feature_flags_definitions_errors_total") > errs
	})
	if got := routesTo(t, siteA, 20); got != "new" {
		t.Fatalf("while PostHog times out: %s", got)
	}
	ph.Stall(0)

	// Over quota: definitions are dropped, every flag serves false.
	ph.FailWith(http.StatusPaymentRequired)
	eventually(t, 5*time.Second, "the 402 to drop definitions", func() bool { return routesTo(t, siteA, 20) == "old" })
	code, body := adminDo(t, http.MethodGet, adminURL+"/feature_flags/", "")
	if code != http.StatusOK || !strings.Contains(body, "quota limited") || !strings.Contains(body, `"flag_count": 0`) {
		t.Errorf("status after a 402: %d %s", code, body)
	}
	// A wrong key keeps the last good definitions.
	ph.FailWith(0)
	eventually(t, 5*time.Second, "recovery", func() bool { return routesTo(t, siteA, 20) == "new" })
	refusedBefore := answered(ph, http.StatusUnauthorized)
	ph.FailWith(http.StatusUnauthorized)
	eventually(t, 5*time.Second, "two polls refused", func() bool { return answered(ph, http.StatusUnauthorized) >= refusedBefore+2 })
	if st := adminStatusOf(t, adminURL); !strings.Contains(st.Source.Error, "refused the key") {
		t.Errorf("status after a 401: %+v", st.Source)
	}
	if got := routesTo(t, siteA, 20); got != "new" {
		t.Fatalf("a 401 changed routing: %s", got)
	}
	ph.FailWith(0)
}

// answered counts the definitions requests the stand-in answered with status.
func answered(ph *posthogtest.Server, status int) int {
	n := 0
	for _, r := range ph.Requests() {
		if r.Status == status {
			n++
		}
	}
	return n
}

func TestKillSwitchOverrideSurvivesReload(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, checkoutDefs(100))
	t.Cleanup(ph.Close)
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := t.TempDir()
	load(t, postHogSite(storage, ph.URL, old, nu, "", ""))
	eventually(t, 5*time.Second, "definitions", func() bool { return routesTo(t, siteA, 10) == "new" })

	code, body := adminDo(t, http.MethodPut, adminURL+"/feature_flags/overrides/checkout", `{"killed": true}`)
	if code != http.StatusOK {
		t.Fatalf("PUT override: %d %s", code, body)
	}
	// Effective for the very next request, no waiting.
	if got := routesTo(t, siteA, 20); got != "old" {
		t.Fatalf("after the kill switch: %s", got)
	}
	// A config reload (a different config, so Caddy really reloads) keeps it.
	load(t, postHogSite(storage, ph.URL, old, nu, "", "header X-Reloaded yes"))
	resp, _ := get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": "x"})
	if resp.Header.Get("X-Reloaded") != "yes" {
		t.Fatal("the new config is not running")
	}
	if got := routesTo(t, siteA, 20); got != "old" {
		t.Fatalf("after a reload: %s", got)
	}
	code, body = adminDo(t, http.MethodDelete, adminURL+"/feature_flags/overrides/checkout", "")
	if code != http.StatusOK {
		t.Fatalf("DELETE override: %d %s", code, body)
	}
	if got := routesTo(t, siteA, 20); got != "new" {
		t.Fatalf("after clearing the override: %s", got)
	}

	// A rollout cap: exactly the users PostHog's hash puts under 30 % reach new.
	code, body = adminDo(t, http.MethodPut, adminURL+"/feature_flags/overrides/checkout", `{"rollout_percentage": 30}`)
	if code != http.StatusOK {
		t.Fatalf("PUT rollout: %d %s", code, body)
	}
	for i := 0; i < 200; i++ {
		id := fmt.Sprintf("cap-%d", i)
		_, e := get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": id})
		want := "old"
		if hashOf("checkout", id) <= 0.30 {
			want = "new"
		}
		if e.Upstream != want {
			t.Fatalf("%s (hash %v) at 30%%: %s", id, hashOf("checkout", id), e.Upstream)
		}
	}
	adminDo(t, http.MethodDelete, adminURL+"/feature_flags/overrides/checkout", "")
}

func TestAdminAPI(t *testing.T) {
	defsFile := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, defsFile, []byte(`{"flags": [
		{"id": 1, "key": "used", "active": true, "version": 4, "filters": {"groups": [{"properties": [{"key": "plan", "value": "pro"}]}],
			"multivariate": {"variants": [{"key": "a", "rollout_percentage": 50}, {"key": "b", "rollout_percentage": 50}]}}},
		{"id": 2, "key": "unused", "active": true, "filters": {"groups": [{}]}},
		{"id": 3, "key": "continuity", "active": true, "ensure_experience_continuity": true, "filters": {"groups": [{}]}}
	]}`))
	old := newUpstream(t, "old")
	load(t, fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
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
}`, globals(t.TempDir()), defsFile, old.dial(), old.dial(), old.dial()))
	api := adminURL + "/feature_flags"

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
	for i := 0; i < 5; i++ {
		get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("u%d", i), "X-Plan": "pro"})
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
	// Nothing is stale yet (stale_after is 30 days; TestStaleFlags moves a
	// clock through it).
	if byKey["unused"].Activity.Stale || byKey["unused"].Activity.LastEvaluated != nil || len(st.StaleFlags) != 0 {
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

// A flag is stale once it has not been evaluated for stale_after; one never
// evaluated counts from when tracking began.
func TestStaleFlags(t *testing.T) {
	app := newTestApp(t, []byte(`{"flags": [
		{"key": "used", "active": true, "filters": {"groups": [{}]}},
		{"key": "unused", "active": true, "filters": {"groups": [{}]}}]}`), 0)
	app.StaleAfter = caddy.Duration(2 * time.Second)
	h := &Handler{Flags: []string{"used"}}
	if err := h.setup(app.App, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	w := &discardWriter{h: http.Header{}}
	serve := func() {
		if err := h.ServeHTTP(w, prepare(w, "u1"), caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })); err != nil {
			t.Fatal(err)
		}
	}
	stale := func() string { return strings.Join(app.status(app.clock.Now()).StaleFlags, ",") }
	serve()
	if got := stale(); got != "" {
		t.Fatalf("stale at once: %q", got)
	}
	app.clock.Advance(1500 * time.Millisecond)
	serve()
	app.clock.Advance(1500 * time.Millisecond)
	// 3 s since tracking began, 1.5 s since "used" was last evaluated.
	if got := stale(); got != "unused" {
		t.Errorf("stale after 3s: %q, want unused", got)
	}
	st := app.status(app.clock.Now())
	for _, f := range st.Flags {
		if f.Key == "used" && (f.Activity.LastEvaluated == nil || !f.Activity.LastEvaluated.Equal(app.clock.Now().Add(-1500*time.Millisecond).Truncate(time.Second))) {
			t.Errorf("used last evaluated %v", f.Activity.LastEvaluated)
		}
	}
	app.clock.Advance(time.Second)
	if got := stale(); got != "used,unused" {
		t.Errorf("stale after 4s: %q", got)
	}
}

// Every override change and delete is logged with the flag, the old and new
// value and who made it, and emitted as a Caddy event; so are definitions
// refreshed and refused.
func TestOverrideChangesAndDefinitionsAreAudited(t *testing.T) {
	storage := t.TempDir()
	defsFile := filepath.Join(storage, "flags.json")
	writeFileAtomically(t, defsFile, checkoutDefs(100))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	cfg, events := withEventRecorder(t, fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
		watch_interval 1h
	}
}
:9080 {
	feature_flags
	%s
}`, globals(storage), defsFile, checkoutProxy(old, nu)))
	loadJSON(t, cfg)
	api := adminURL + "/feature_flags"

	if code, body := adminDo(t, http.MethodPut, api+"/overrides/checkout", `{"killed": true}`); code != http.StatusOK {
		t.Fatalf("PUT: %d %s", code, body)
	}
	if code, body := adminDo(t, http.MethodPut, api+"/overrides/checkout", `{"rollout_percentage": 20}`); code != http.StatusOK {
		t.Fatalf("PUT: %d %s", code, body)
	}
	if code, body := adminDo(t, http.MethodDelete, api+"/overrides/checkout", ""); code != http.StatusOK {
		t.Fatalf("DELETE: %d %s", code, body)
	}
	var audit []string
	for _, line := range logOf(t, storage) {
		if msg := line["msg"]; msg == "override set" || msg == "override deleted" {
			by, _ := line["by"].(string)
			if line["flag"] != "checkout" || !strings.HasPrefix(by, "admin 127.0.0.1:") || line["revision"] == nil {
				t.Errorf("audit line %v", line)
			}
			audit = append(audit, fmt.Sprintf("%v old=%v new=%v", msg, line["old"], line["new"]))
		}
	}
	want := []string{
		"override set old=<nil> new=map[killed:true]",
		"override set old=map[killed:true] new=map[rollout_percentage:20]",
		"override deleted old=map[rollout_percentage:20] new=<nil>",
	}
	if strings.Join(audit, "\n") != strings.Join(want, "\n") {
		t.Errorf("audit log:\n%s\nwant:\n%s", strings.Join(audit, "\n"), strings.Join(want, "\n"))
	}
	changed := events.named("override_changed")
	if len(changed) != 3 {
		t.Fatalf("%d override_changed events, want 3", len(changed))
	}
	if d := changed[0].Data; d["flag"] != "checkout" || d["new"] != (eval.Override{Killed: true}) || d["old"] != nil {
		t.Errorf("first event %v", d)
	}
	if d := changed[2].Data; d["new"] != nil || d["old"] == nil || !strings.HasPrefix(fmt.Sprint(d["by"]), "admin ") {
		t.Errorf("delete event %v", d)
	}

	// Definitions: a refresh that reads a new file, then a broken one.
	writeFileAtomically(t, defsFile, checkoutDefs(30))
	if code, body := adminDo(t, http.MethodPost, api+"/refresh", ""); code != http.StatusOK || !strings.Contains(body, "modified") {
		t.Fatalf("refresh: %d %s", code, body)
	}
	writeFileAtomically(t, defsFile, []byte(`{"flags": [`))
	if code, _ := adminDo(t, http.MethodPost, api+"/refresh", ""); code != http.StatusBadGateway {
		t.Errorf("refresh of a broken file: %d", code)
	}
	refreshed, failed := events.named("definitions_refreshed"), events.named("definitions_failed")
	if len(refreshed) != 1 || refreshed[0].Data["source"] != "file" || refreshed[0].Data["flags"] != 3 {
		t.Errorf("definitions_refreshed events: %+v", refreshed)
	}
	if len(failed) != 1 || !strings.Contains(fmt.Sprint(failed[0].Data["error"]), "line 1, column 12") {
		t.Errorf("definitions_failed events: %+v", failed)
	}
}

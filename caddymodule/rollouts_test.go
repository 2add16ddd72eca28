package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/rollout"
)

// rolloutSite is a Caddyfile routing by checkout from a definitions file, with
// the rollout block given.
func rolloutSite(globalOpts, defsFile, rolloutBlock string, old, nu *upstream, extra string) string {
	return fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
		sync_interval 100ms
		%s
		%s
	}
}
:9080 {
	feature_flags
	%s
}`, globalOpts, defsFile, extra, rolloutBlock, checkoutProxy(old, nu))
}

func rolloutOf(t *testing.T, admin, flag string) rolloutStatus {
	t.Helper()
	code, body := adminDo(t, http.MethodGet, admin+"/feature_flags/rollouts/"+flag, "")
	var st rolloutStatus
	if code != http.StatusOK || json.Unmarshal([]byte(body), &st) != nil {
		t.Fatalf("rollout status: %d %s", code, body)
	}
	return st
}

// expectCap checks that exactly the users PostHog's hash puts under pct % of
// checkout reach new.
func expectCap(t *testing.T, addr string, pct float64, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("cap-%d", i)
		_, e := get(t, "http://"+addr+"/", map[string]string{"X-POSTHOG-DISTINCT-ID": id})
		want := "old"
		if hashOf("checkout", id) <= pct/100 {
			want = "new"
		}
		if e.Upstream != want {
			t.Fatalf("%s (hash %.3f) at %v%%: reached %q", id, hashOf("checkout", id), pct, e.Upstream)
		}
	}
}

func TestRolloutRollsBackWhenTheNewSideFails(t *testing.T) {
	storage := t.TempDir()
	defsFile := filepath.Join(storage, "flags.json")
	writeFileAtomically(t, defsFile, checkoutDefs(100))
	old, nu := newUpstream(t, "old"), newSwitchableUpstream(t, "new")
	block := `rollout checkout {
			steps 50 100
			step_duration 1h
			min_requests 10
			guardrail error_rate 2x
		}`
	cfg, events := withEventRecorder(t, rolloutSite(globals(storage), defsFile, block, old, nu.upstream, ""))
	loadJSON(t, cfg)
	api := adminURL + "/feature_flags"

	// The first step caps the flag at 50 % with PostHog's hash.
	expectCap(t, siteA, 50, 100)
	if st := rolloutOf(t, adminURL, "checkout"); st.State != rollout.Running || st.Percentage != 50 {
		t.Fatalf("at start: %+v", st)
	}
	if got := metricSum(t, "caddy_feature_flags_rollout_percentage", map[string]string{"flag": "checkout"}); got != 50 {
		t.Errorf("rollout_percentage gauge = %v, want 50", got)
	}

	// The new side starts failing: the guardrail sees its users' 5xx against
	// control's clean answers and rolls the flag back.
	rollbacks := func() float64 {
		return metricSum(t, "caddy_feature_flags_rollbacks_total", map[string]string{"flag": "checkout", "guardrail": "error_rate 2x"})
	}
	rollbacksBefore := rollbacks()
	nu.failStatus.Store(http.StatusBadGateway)
	failures := 0
	eventually(t, 20*time.Second, "the guardrail to roll back", func() bool {
		for i := 0; i < 20; i++ {
			resp, _ := get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("load-%d-%d", failures, i)})
			if resp.StatusCode >= 500 {
				failures++
			}
		}
		// The event comes once the rollback is complete: enforced, its
		// kill override and record stored.
		return len(events.named("rollout_rolled_back")) > 0
	})
	if failures == 0 {
		t.Fatal("no request reached the failing side before the rollback")
	}
	// Everyone is on the old side now, at once and with no failed request.
	if got := routesTo(t, siteA, 100); got != "old" {
		t.Fatalf("after the rollback: %s", got)
	}
	st := rolloutOf(t, adminURL, "checkout")
	if st.Percentage != 0 || !strings.Contains(st.Reason, "error_rate 2x") || !st.KillOverride || st.StoredAt == nil {
		t.Errorf("rolled-back status: %+v", st)
	}
	if code, body := adminDo(t, http.MethodGet, api+"/overrides/checkout", ""); code != 200 || !strings.Contains(body, `"killed": true`) {
		t.Errorf("kill override after the rollback: %d %s", code, body)
	}
	if got := rollbacks() - rollbacksBefore; got != 1 {
		t.Errorf("rollbacks_total rose by %v, want 1", got)
	}
	if got := metricSum(t, "caddy_feature_flags_rollout_percentage", map[string]string{"flag": "checkout"}); got != 0 {
		t.Errorf("rollout_percentage gauge after the rollback = %v", got)
	}
	rolledBack := events.named("rollout_rolled_back")
	if len(rolledBack) != 1 || rolledBack[0].Data["flag"] != "checkout" || rolledBack[0].Data["guardrail"] != "error_rate 2x" {
		t.Errorf("rollout_rolled_back events: %+v", rolledBack)
	}
	data, err := os.ReadFile(filepath.Join(storage, "feature_flags", "local", "rollouts.json"))
	if err != nil || !strings.Contains(string(data), `"state":"rolled_back"`) {
		t.Errorf("stored progress: %s %v", data, err)
	}

	// Operators drive it by hand. Resuming a rolled-back rollout starts it
	// over at its first step and lifts the rollback's kill.
	nu.failStatus.Store(0)
	for _, c := range []struct {
		action string
		status int
		state  rollout.State
		pct    float64
	}{
		{"promote", 409, "", 0},
		{"resume", 200, rollout.Running, 50},
		{"resume", 409, "", 0},
		{"pause", 200, rollout.Paused, 50},
		{"pause", 409, "", 0},
		{"promote", 200, rollout.Paused, 100},
		{"abort", 200, rollout.Aborted, 0},
		{"abort", 409, "", 0},
	} {
		code, body := adminDo(t, http.MethodPost, api+"/rollouts/checkout/"+c.action, "")
		if code != c.status {
			t.Fatalf("%s: %d %s, want %d", c.action, code, body, c.status)
		}
		if code != 200 {
			continue
		}
		var got rolloutStatus
		if err := json.Unmarshal([]byte(body), &got); err != nil || got.State != c.state || got.Percentage != c.pct {
			t.Fatalf("%s: %s, want %s at %v%%", c.action, body, c.state, c.pct)
		}
		if c.action == "resume" {
			if code, _ := adminDo(t, http.MethodGet, api+"/overrides/checkout", ""); code != 404 {
				t.Errorf("the rollback's kill override is still set after resume")
			}
			expectCap(t, siteA, 50, 100)
		}
		if c.pct == 100 {
			if got := routesTo(t, siteA, 30); got != "new" {
				t.Errorf("promoted to 100 %%: %s", got)
			}
		}
	}
	if got := routesTo(t, siteA, 30); got != "old" {
		t.Errorf("after abort: %s", got)
	}
	if len(events.named("rollout_paused")) != 1 || len(events.named("rollout_aborted")) != 1 || len(events.named("rollout_restarted")) != 1 {
		t.Errorf("operator events missing: %d paused, %d aborted, %d restarted",
			len(events.named("rollout_paused")), len(events.named("rollout_aborted")), len(events.named("rollout_restarted")))
	}
	code, body := adminDo(t, http.MethodPost, api+"/rollouts/hero/pause", "")
	if code != 404 || !strings.Contains(body, "no rollout") {
		t.Errorf("action on a flag without a rollout: %d %s", code, body)
	}
	code, body = adminDo(t, http.MethodGet, api+"/rollouts", "")
	if code != 200 || !strings.Contains(body, `"flag": "checkout"`) || !strings.Contains(body, `"state": "aborted"`) {
		t.Errorf("rollouts list: %d %s", code, body)
	}
	if st := adminStatusOf(t, adminURL); len(st.Flags) == 0 {
		t.Error("no flags in status")
	} else {
		for _, f := range st.Flags {
			if (f.Key == "checkout") != (f.Rollout != nil) {
				t.Errorf("flag %s: rollout %+v", f.Key, f.Rollout)
			}
		}
	}
}

func TestRolloutPromotesStepByStep(t *testing.T) {
	storage := t.TempDir()
	defsFile := filepath.Join(storage, "flags.json")
	writeFileAtomically(t, defsFile, checkoutDefs(100))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	// A step lasts as long as it takes the new side to serve 20 requests:
	// promotion follows the traffic, not the clock.
	block := `rollout checkout {
			steps 10 40 100
			step_duration 1ns
			min_requests 20
			guardrail error_rate 2x
			guardrail latency p99 +1s
		}`
	cfg, events := withEventRecorder(t, rolloutSite(globals(storage), defsFile, block, old, nu, ""))
	loadJSON(t, cfg)

	expectCap(t, siteA, 10, 60)
	// Healthy traffic on both sides: each step passes once it has carried
	// 20 requests on the new side.
	seen := map[float64]bool{}
	i := 0
	eventually(t, 20*time.Second, "the rollout to complete", func() bool {
		for j := 0; j < 10; j++ {
			get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("u-%d", i)})
			i++
		}
		st := rolloutOf(t, adminURL, "checkout")
		seen[st.Percentage] = true
		return st.State == rollout.Completed
	})
	if !seen[40] {
		t.Errorf("never saw the 40 %% step: %v", seen)
	}
	if got := routesTo(t, siteA, 50); got != "new" {
		t.Fatalf("after completion: %s", got)
	}
	promoted := events.named("rollout_promoted")
	if len(promoted) != 2 || promoted[0].Data["from"] != 10.0 || promoted[0].Data["to"] != 40.0 ||
		promoted[1].Data["from"] != 40.0 || promoted[1].Data["to"] != 100.0 {
		t.Errorf("promotion events: %+v", promoted)
	}
	if len(events.named("rollout_completed")) != 1 {
		t.Errorf("completion events: %+v", events.named("rollout_completed"))
	}
	st := rolloutOf(t, adminURL, "checkout")
	if st.Total.Treatment.Requests == 0 || st.Total.Control.Requests == 0 || st.Total.Treatment.Errors != 0 {
		t.Errorf("counts: %+v", st.Total)
	}

	// A reload that keeps the rollout keeps its progress.
	cfg, _ = withEventRecorder(t, rolloutSite(globals(storage), defsFile, block, old, nu, "stale_after 48h"))
	loadJSON(t, cfg)
	if st := rolloutOf(t, adminURL, "checkout"); st.State != rollout.Completed {
		t.Errorf("after a reload: %+v", st)
	}
}

func TestRolloutProgressSurvivesRestartAndIsShared(t *testing.T) {
	storage := t.TempDir()
	defsFile := filepath.Join(storage, "flags.json")
	writeFileAtomically(t, defsFile, checkoutDefs(100))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	config := fmt.Sprintf(`{
	%s
	storage file_system %s
	skip_install_trust
	auto_https off
	grace_period 1ns
	feature_flags {
		definitions %s
		sync_interval 100ms
		rollout checkout {
			steps 5 25 50 100
			step_duration 1h
			guardrail error_rate 2x
		}
	}
}
%s
	feature_flags
	%s
}`, childAdmin, storage, defsFile, childSite, checkoutProxy(old, nu))
	portsA, portsB := reservePorts(t), reservePorts(t)
	first := startCaddy(t, portsA, config)
	// A second instance sharing the storage follows what operators do on
	// the first.
	second := startCaddy(t, portsB, config)
	for _, action := range []string{"promote", "promote", "pause"} {
		if code, body := adminDo(t, http.MethodPost, portsA.adminURL+"/feature_flags/rollouts/checkout/"+action, ""); code != 200 {
			t.Fatalf("%s: %d %s", action, code, body)
		}
	}
	expectCap(t, portsA.siteAddr, 50, 60)
	eventually(t, 5*time.Second, "the second instance to adopt the progress", func() bool {
		st := rolloutOf(t, portsB.adminURL, "checkout")
		return st.State == rollout.Paused && st.Percentage == 50
	})
	expectCap(t, portsB.siteAddr, 50, 60)

	// An abort on the second instance ends the rollout on both; a restart
	// on the first begins a new attempt, which the second follows from its
	// ended state.
	if code, body := adminDo(t, http.MethodPost, portsB.adminURL+"/feature_flags/rollouts/checkout/abort", ""); code != 200 {
		t.Fatalf("abort on the second instance: %d %s", code, body)
	}
	eventually(t, 5*time.Second, "the first instance to adopt the abort", func() bool {
		return rolloutOf(t, portsA.adminURL, "checkout").State == rollout.Aborted
	})
	if got := routesTo(t, portsA.siteAddr, 30); got != "old" {
		t.Fatalf("first instance after the abort: %s", got)
	}
	for _, action := range []string{"resume", "promote"} {
		if code, body := adminDo(t, http.MethodPost, portsA.adminURL+"/feature_flags/rollouts/checkout/"+action, ""); code != 200 {
			t.Fatalf("%s on the first instance: %d %s", action, code, body)
		}
	}
	eventually(t, 5*time.Second, "the second instance to follow the new attempt", func() bool {
		st := rolloutOf(t, portsB.adminURL, "checkout")
		return st.State == rollout.Running && st.Percentage == 25
	})
	expectCap(t, portsB.siteAddr, 25, 60)
	second.stop()
	first.stop()

	restartCaddy(t, portsA, first.config)
	st := rolloutOf(t, portsA.adminURL, "checkout")
	if st.State != rollout.Running || st.Step != 1 || st.Percentage != 25 || st.Attempt != 1 {
		t.Fatalf("after a restart: %+v", st)
	}
	expectCap(t, portsA.siteAddr, 25, 60)
}

// Every response of a ramped flag is observed on the side it was served:
// "false" (inconclusive answers included: they are served false, to the old
// side) and "control" are control, every other value the new side; 5xx
// responses count as errors.
func TestRolloutObservesEveryResponseOnItsSide(t *testing.T) {
	app := newTestApp(t, []byte(`{"flags": [
		{"id": 1, "key": "checkout", "active": true, "filters": {"groups": [
			{"properties": [{"key": "plan", "type": "person", "value": ["pro"]}], "rollout_percentage": 100},
			{"properties": [], "rollout_percentage": 100}]}},
		{"id": 2, "key": "hero", "active": true, "filters": {"groups": [{}], "multivariate": {"variants": [
			{"key": "control", "rollout_percentage": 50}, {"key": "test", "rollout_percentage": 50}]}}}
	]}`), 0)
	startTestRollout(t, app, &RolloutConfig{Flag: "checkout", Steps: []float64{40, 100}})
	startTestRollout(t, app, &RolloutConfig{Flag: "hero", Steps: []float64{100}})
	h := newTestHandler(t, app)
	w := &discardWriter{h: http.Header{}}
	var want struct{ checkoutNew, checkoutOld, checkoutNewErrors, heroControl, heroTest uint64 }
	inconclusive := 0
	for i := 0; i < 400; i++ {
		id := fmt.Sprintf("obs-%d", i)
		r := prepare(w, id)
		if i%2 == 0 {
			r.Header.Set("X-Plan", "basic") // known: conclusive answers
		} else {
			r.Header.Del("X-Plan") // missing: the first condition is inconclusive
		}
		status := http.StatusOK
		if i%5 == 0 {
			status = http.StatusInternalServerError
		}
		next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			w.WriteHeader(status)
			return nil
		})
		if err := h.ServeHTTP(w, r, next); err != nil {
			t.Fatal(err)
		}
		// checkout: true within the 40 % cap by PostHog's hash (the second
		// condition matches even when the first is inconclusive); outside
		// it false, conclusively with a plan, inconclusively without.
		if hashOf("checkout", id) <= 0.40 {
			want.checkoutNew++
			if status >= 500 {
				want.checkoutNewErrors++
			}
		} else {
			want.checkoutOld++
			if i%2 == 1 && app.engine.definitions().Evaluate("checkout", &eval.Subject{DistinctID: id}).Inconclusive() {
				inconclusive++
			}
		}
		if variantOf(t, app, "hero", id) == "control" {
			want.heroControl++
		} else {
			want.heroTest++
		}
	}
	checkout := app.engine.rollouts.InForce().Run("checkout").Ramp().Status().Total
	if checkout.Treatment.Requests != want.checkoutNew || checkout.Control.Requests != want.checkoutOld ||
		checkout.Treatment.Errors != want.checkoutNewErrors {
		t.Errorf("checkout observed %+v, want new %d (errors %d), old %d", checkout, want.checkoutNew, want.checkoutNewErrors, want.checkoutOld)
	}
	if want.checkoutNew == 0 || want.checkoutOld == 0 {
		t.Fatalf("the ids do not exercise both sides: %+v", want)
	}
	if inconclusive == 0 {
		t.Error("no inconclusive answer was exercised")
	}
	hero := app.engine.rollouts.InForce().Run("hero").Ramp().Status().Total
	if hero.Control.Requests != want.heroControl || hero.Treatment.Requests != want.heroTest {
		t.Errorf("hero observed %+v, want control %d, test %d", hero, want.heroControl, want.heroTest)
	}
}

func variantOf(t *testing.T, app *testApp, flag, id string) string {
	t.Helper()
	return app.engine.definitions().Evaluate(flag, &eval.Subject{DistinctID: id}).Value()
}

func TestRolloutWithUnreadableStoredProgress(t *testing.T) {
	storage := t.TempDir()
	defsFile := filepath.Join(storage, "flags.json")
	writeFileAtomically(t, defsFile, checkoutDefs(100))
	stored := filepath.Join(storage, "feature_flags", "local", "rollouts.json")
	if err := os.MkdirAll(filepath.Dir(stored), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(stored, []byte(`{"rollouts": {"checkout": {"progress": `), 0o600); err != nil {
		t.Fatal(err)
	}
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	block := `rollout checkout {
			steps 20 60
		}`
	load(t, rolloutSite(globals(storage), defsFile, block, old, nu, ""))

	// The broken record is ignored: the rollout starts at its first step.
	if st := rolloutOf(t, adminURL, "checkout"); st.State != rollout.Running || st.Percentage != 20 {
		t.Fatalf("with unreadable stored progress: %+v", st)
	}
	expectCap(t, siteA, 20, 50)
	// The next change replaces it with a readable record.
	if code, body := adminDo(t, http.MethodPost, adminURL+"/feature_flags/rollouts/checkout/promote", ""); code != 200 {
		t.Fatalf("promote: %d %s", code, body)
	}
	var doc rollout.Records
	data, err := os.ReadFile(stored)
	if err != nil || json.Unmarshal(data, &doc) != nil || doc.Rollouts["checkout"].Progress.Step != 1 {
		t.Fatalf("stored progress after promote: %s %v", data, err)
	}
	expectCap(t, siteA, 60, 50)
}

// A reload that fails leaves the running config's rollouts in force, whichever
// order Caddy started the new config's apps in before the failure.
func TestRolloutsOfAFailedReloadAreNotKept(t *testing.T) {
	storage := t.TempDir()
	defsFile := filepath.Join(storage, "flags.json")
	writeFileAtomically(t, defsFile, checkoutDefs(100))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	load(t, rolloutSite(globals(storage), defsFile, "rollout checkout {\n\t\t\tsteps 50 100\n\t\t}", old, nu, ""))

	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	broken := rolloutSite(globals(storage), defsFile, "rollout checkout {\n\t\t\tsteps 10 100\n\t\t}", old, nu, "") +
		"\nhttp://" + busy.Addr().String() + " {\n\trespond ok\n}\n"
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(broken), nil)
	if err != nil {
		t.Fatal(err)
	}
	for attempt := 0; attempt < 5; attempt++ {
		resp, err := adminClient.Post(adminURL+"/load", "application/json", strings.NewReader(string(adapted)))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Fatal("a config listening on a busy port loaded")
		}
		if st := rolloutOf(t, adminURL, "checkout"); st.Percentage != 50 {
			t.Fatalf("after a failed reload the rollout is at %v %%, want the running config's 50 %%", st.Percentage)
		}
		expectCap(t, siteA, 50, 40)
	}
}

// reached is the upstream a user's request reached, whether it answered or
// failed, and the flag header that upstream was sent ("" when it failed).
func reached(t *testing.T, id string) (upstream, header string) {
	t.Helper()
	resp, e := get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": id})
	if u := resp.Header.Get("X-Upstream"); u != "" {
		return u, ""
	}
	return e.Upstream, e.Headers.Get("X-Feature-Flag-checkout")
}

// A dry-run rollout whose new side fails: the guardrail breach is judged and
// reported (status, event, log, metrics, all saying dry run), but requests
// are routed and headed exactly as the flag's own 50 % says, before and
// after the breach, never at the ramp's 10 % step, and nothing is killed.
func TestADryRunRolloutReportsTheBreachAndRoutesAsWithoutIt(t *testing.T) {
	storage := t.TempDir()
	defsFile := filepath.Join(storage, "flags.json")
	writeFileAtomically(t, defsFile, checkoutDefs(50))
	old, nu := newUpstream(t, "old"), newSwitchableUpstream(t, "new")
	block := `rollout checkout {
			steps 10 100
			step_duration 1h
			min_requests 10
			guardrail error_rate 2x
			dry_run
		}`
	cfg, events := withEventRecorder(t, rolloutSite(globals(storage), defsFile, block, old, nu.upstream, ""))
	loadJSON(t, cfg)
	api := adminURL + "/feature_flags"

	// As without the rollout: the flag's own 50 % by PostHog's hash, and the
	// header says what routed.
	routesAsTheFlag := func(when string) {
		t.Helper()
		for i := 0; i < 100; i++ {
			id := fmt.Sprintf("dry-%d", i)
			want, wantHeader := "old", "false"
			if hashOf("checkout", id) <= 0.5 {
				want, wantHeader = "new", "true"
			}
			got, header := reached(t, id)
			if got != want || (header != "" && header != wantHeader) {
				t.Fatalf("%s: %s (hash %.3f) reached %s with header %q, want %s with %q", when, id, hashOf("checkout", id), got, header, want, wantHeader)
			}
		}
	}
	routesAsTheFlag("at the start")
	st := rolloutOf(t, adminURL, "checkout")
	if st.State != rollout.Running || st.Percentage != 10 || !st.DryRun || st.Enforced != (rollout.Cap{Percentage: 100}) {
		t.Fatalf("at start: %+v", st)
	}
	if got := metricSum(t, "caddy_feature_flags_rollout_dry_run", map[string]string{"flag": "checkout"}); got != 1 {
		t.Errorf("rollout_dry_run gauge = %v", got)
	}
	rollbacks := func() float64 {
		return metricSum(t, "caddy_feature_flags_rollbacks_total", map[string]string{"flag": "checkout"})
	}
	breaches := func() float64 {
		return metricSum(t, "caddy_feature_flags_rollout_breaches_total",
			map[string]string{"flag": "checkout", "guardrail": "error_rate 2x", "action": "rolled_back", "dry_run": "true"})
	}
	rollbacksBefore, breachesBefore := rollbacks(), breaches()

	nu.failStatus.Store(http.StatusBadGateway)
	n := 0
	eventually(t, 20*time.Second, "the dry run to judge the breach", func() bool {
		for i := 0; i < 20; i++ {
			get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("dry-load-%d", n)})
			n++
		}
		return len(events.named("rollout_rolled_back")) > 0
	})
	// Still failing, still routed as the flag says: the dry run kills nothing.
	routesAsTheFlag("after the breach, new side failing")
	nu.failStatus.Store(0)
	routesAsTheFlag("after the breach")

	st = rolloutOf(t, adminURL, "checkout")
	if st.State != rollout.RolledBack || !st.DryRun || st.Enforced != (rollout.Cap{Percentage: 100}) || st.KillOverride ||
		!strings.Contains(st.Reason, "error_rate 2x") {
		t.Errorf("dry run after the breach: %+v", st)
	}
	if code, body := adminDo(t, http.MethodGet, api+"/overrides/checkout", ""); code != http.StatusNotFound {
		t.Errorf("a dry run set an override: %d %s", code, body)
	}
	ev := events.named("rollout_rolled_back")
	if len(ev) != 1 || ev[0].Data["dry_run"] != true || ev[0].Data["guardrail"] != "error_rate 2x" {
		t.Errorf("rollout_rolled_back events: %+v", ev)
	}
	if got := rollbacks() - rollbacksBefore; got != 0 {
		t.Errorf("rollbacks_total rose by %v for a dry run", got)
	}
	if got := breaches() - breachesBefore; got != 1 {
		t.Errorf("rollout_breaches_total{dry_run=true} rose by %v, want 1", got)
	}
	found := false
	for _, line := range logOf(t, storage) {
		if msg, _ := line["msg"].(string); strings.Contains(msg, "guardrail breached (dry run)") && line["dry_run"] == true {
			found = true
		}
	}
	if !found {
		t.Error("no log line reports the dry run's breach")
	}
}

// biasedAssignment serves users through the real handler and selection
// policy of app. Every third user the flag puts on the new side is sent a
// pool without the new upstream, as a broken assignment in front of the
// proxy would: the policy falls back, and the user is served the old side.
func biasedAssignment(t *testing.T, app *testApp, prefix string, n int, biased bool) {
	t.Helper()
	h := newTestHandler(t, app)
	p := newTestPolicy(t, app, "checkout")
	both := reverseproxy.UpstreamPool{{Dial: "old:8080"}, {Dial: "new:8080"}}
	oldOnly := reverseproxy.UpstreamPool{{Dial: "old:8080"}}
	w := &discardWriter{h: http.Header{}}
	newSide := 0
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("%s-%d", prefix, i)
		pool := both
		if variantOf(t, app, "checkout", id) == "true" {
			if newSide++; biased && newSide%3 == 0 {
				pool = oldOnly
			}
		}
		next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			if p.Select(pool, r, w) == nil {
				t.Fatal("no upstream selected")
			}
			w.WriteHeader(http.StatusOK)
			return nil
		})
		for range 2 { // a returning user is still one user
			if err := h.ServeHTTP(w, prepare(w, id), next); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// A biased assignment (a third of the new side's users served the old side)
// is a sample-ratio mismatch: the ramp holds although its step has lasted
// step_duration and carried min_requests, and the status, the metric and
// the change say why. The same traffic without the bias promotes.
func TestASampleRatioMismatchHoldsTheRamp(t *testing.T) {
	for _, biased := range []bool{true, false} {
		app := newTestApp(t, checkoutDefs(100), 0)
		startTestRollout(t, app, &RolloutConfig{Flag: "checkout", Steps: []float64{50, 100},
			StepDuration: caddy.Duration(10 * time.Minute), MinRequests: ptr(uint64(50))})
		var changes []rollout.Change
		hooks := app.rolloutHooks()
		changed := hooks.Changed
		hooks.Changed = func(ch rollout.Change) { changes = append(changes, ch); changed(ch) }

		biasedAssignment(t, app, fmt.Sprintf("srm-%v", biased), 600, biased)
		app.clock.Advance(10 * time.Minute)
		app.engine.rollouts.Tick(context.Background(), hooks)
		st := rolloutStatusOf(app.engine.rollouts.InForce().Run("checkout"))
		sr := st.SampleRatio
		if st.Total.Treatment.Requests < 50 {
			t.Fatalf("biased %v: only %d requests on the new side", biased, st.Total.Treatment.Requests)
		}
		if sr.ExpectedShare == nil || *sr.ExpectedShare != 0.5 || sr.TreatmentUsers+sr.ControlUsers != 600 {
			t.Fatalf("biased %v: sample ratio %+v", biased, sr)
		}
		mismatch := gaugeValue(t, rolloutSampleRatioMismatch.WithLabelValues("checkout"))
		if !biased {
			if st.State != rollout.Running || st.Percentage != 100 || sr.Mismatch || mismatch != 0 {
				t.Fatalf("honest split: %+v (gauge %v)", st, mismatch)
			}
			continue
		}
		if st.State != rollout.Held || st.Percentage != 50 || !sr.Mismatch || !strings.Contains(st.Reason, rollout.SampleRatioGuard) {
			t.Fatalf("biased split: state %s at %v%%, %+v, reason %q", st.State, st.Percentage, sr, st.Reason)
		}
		if got := float64(sr.TreatmentUsers) / float64(sr.TreatmentUsers+sr.ControlUsers); got > 0.4 {
			t.Errorf("observed treatment share %.3f: the bias did not reach the check", got)
		}
		if mismatch != 1 {
			t.Errorf("rollout_sample_ratio_mismatch gauge = %v", mismatch)
		}
		if len(changes) != 1 || changes[0].Kind != rollout.EventHeld || changes[0].Guardrail != rollout.SampleRatioGuard {
			t.Errorf("changes: %+v", changes)
		}
		// Held: more time and traffic do not promote it.
		app.clock.Advance(time.Hour)
		app.engine.rollouts.Tick(context.Background(), hooks)
		if st := app.engine.rollouts.InForce().Run("checkout").Ramp().Status(); st.State != rollout.Held || st.Percentage != 50 {
			t.Errorf("held ramp moved: %s at %v%%", st.State, st.Percentage)
		}
	}
}

func ptr[T any](v T) *T { return &v }

// gaugeValue reads one gauge, gathered as a registry would.
func gaugeValue(t *testing.T, g prometheus.Gauge) float64 {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(g)
	families, err := reg.Gather()
	if err != nil || len(families) != 1 || len(families[0].GetMetric()) != 1 {
		t.Fatalf("gathering %v: %v", families, err)
	}
	return families[0].GetMetric()[0].GetGauge().GetValue()
}

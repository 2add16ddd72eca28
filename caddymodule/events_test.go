package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/flagsplit/flagsplit/posthog"
	"github.com/flagsplit/flagsplit/posthog/posthogtest"
)

// eventsDefs are checkoutDefs plus a flag that needs a person property the
// site does not provide, so it is never decided locally.
func eventsDefs(t *testing.T) []byte {
	return mergeFlags(t, checkoutDefs(50), []byte(`{"flags": [{"id": 10, "key": "needs-plan", "active": true,
		"filters": {"groups": [{"properties": [{"key": "plan", "type": "person", "operator": "exact", "value": ["pro"]}],
		"rollout_percentage": 100}]}}]}`))
}

// eventsSite is postHogSite with exposure events in mode, and matchers on
// hero and on the flag that is never decided.
func eventsSite(storage, host, mode string, old, nu *upstream) string {
	return generousTimeout(postHogSite(storage, host, old, nu, "events "+mode+" {\n flush_interval 50ms\n batch_size 50\n}", `
	@hero_test feature_flag hero test
	@plan feature_flag needs-plan
	header @hero_test X-Hero test
	header @plan X-Plan yes`))
}

// generousTimeout gives a test site's PostHog requests 30 s instead of 300 ms.
// Tests that count events exactly need it: on a loaded machine a /batch/
// request that times out after the stand-in recorded it is retried, and its
// events arrive twice (PostHog itself deduplicates them by uuid).
func generousTimeout(site string) string {
	return strings.Replace(site, "timeout 300ms", "timeout 30s", 1)
}

// TestExposureEventsReachPostHog sends requests through a real Caddy and checks
// the $feature_flag_called events the stand-in PostHog receives: one per user
// and routing flag, with the value the user was actually served, none for an
// undecided flag, none twice, and, after a reload to "events all", the flags
// that only travelled as headers too.
func TestExposureEventsReachPostHog(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, eventsDefs(t))
	t.Cleanup(ph.Close)
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := t.TempDir()
	load(t, eventsSite(storage, ph.URL, "on", old, nu))
	eventually(t, 5*time.Second, "the definitions", func() bool { return adminReady(t) })
	sentBefore := metricValue(t, "caddy_feature_flags_events_sent_total")

	const users = 150
	served := map[string]map[string]string{} // user -> flag -> value served
	for round := 0; round < 2; round++ {
		for i := 0; i < users; i++ {
			id := fmt.Sprintf("exposed-%d", i)
			resp, e := get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": id})
			checkout := map[string]string{"new": "true", "old": "false"}[e.Upstream]
			if checkout == "" || e.Headers.Get("X-Feature-Flag-Checkout") != checkout {
				t.Fatalf("%s reached %q with header %q", id, e.Upstream, e.Headers.Get("X-Feature-Flag-Checkout"))
			}
			if resp.Header.Get("X-Plan") != "" {
				t.Fatalf("%s matched the undecidable flag", id)
			}
			served[id] = map[string]string{"checkout": checkout, "hero": e.Headers.Get("X-Feature-Flag-Hero"),
				"idle": e.Headers.Get("X-Feature-Flag-Idle")}
		}
	}

	// "on": checkout (selection policy) and hero (matcher) for every user,
	// once although each user came twice; needs-plan never (undecided); idle
	// never (it only travelled as a header).
	eventsDelivered(t, ph, 2*users)
	events, batches := ph.Events()
	if len(events) != 2*users {
		t.Fatalf("PostHog received %d events, want %d (one per user for checkout and hero)", len(events), 2*users)
	}
	if batches < 2*users/50 {
		t.Errorf("%d events in %d batches of at most 50", len(events), batches)
	}
	seen := map[string]bool{}
	for _, e := range events {
		flag, _ := e.Properties["$feature_flag"].(string)
		if seen[e.DistinctID+"/"+flag] {
			t.Errorf("%s: %s reported twice", e.DistinctID, flag)
		}
		seen[e.DistinctID+"/"+flag] = true
		checkExposure(t, e, served)
	}
	for i := 0; i < users; i++ {
		id := fmt.Sprintf("exposed-%d", i)
		if !seen[id+"/checkout"] || !seen[id+"/hero"] {
			t.Errorf("%s: checkout reported %v, hero reported %v", id, seen[id+"/checkout"], seen[id+"/hero"])
		}
	}
	if got := metricValue(t, "caddy_feature_flags_events_sent_total") - sentBefore; got != 2*users {
		t.Errorf("events_sent_total rose by %v, want %d", got, 2*users)
	}

	// Reload with "events all": the queue and what was reported carry over,
	// so the same users now add exactly one event each, for idle.
	load(t, eventsSite(storage, ph.URL, "all", old, nu))
	for i := 0; i < users; i++ {
		get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("exposed-%d", i)})
	}
	eventsDelivered(t, ph, 3*users)
	events, _ = ph.Events()
	if len(events) != 3*users {
		t.Fatalf("after the reload PostHog has %d events, want %d", len(events), 3*users)
	}
	for _, e := range events[2*users:] {
		if e.Properties["$feature_flag"] != "idle" {
			t.Errorf("after the reload: unexpected exposure %s %v", e.DistinctID, e.Properties["$feature_flag"])
		}
		checkExposure(t, e, served)
	}
}

// adminReady reports whether the in-process Caddy serves definitions from
// PostHog.
func adminReady(t *testing.T) bool {
	code, body := adminDo(t, http.MethodGet, adminURL+"/feature_flags/", "")
	var st struct {
		Ready  bool `json:"ready"`
		Source struct {
			Kind string `json:"kind"`
		} `json:"source"`
	}
	return code == http.StatusOK && json.Unmarshal([]byte(body), &st) == nil && st.Ready && st.Source.Kind == "posthog"
}

// checkExposure compares an event with what the user was served.
func checkExposure(t *testing.T, e posthogtest.CapturedEvent, served map[string]map[string]string) {
	t.Helper()
	flag, _ := e.Properties["$feature_flag"].(string)
	want, ok := served[e.DistinctID][flag]
	if !ok || e.Event != "$feature_flag_called" || e.APIKey != testProjectKey {
		t.Errorf("unexpected event %+v", e)
		return
	}
	// Booleans are reported as JSON booleans, variants as strings.
	got := fmt.Sprint(e.Properties["$feature_flag_response"])
	if got != want || fmt.Sprint(e.Properties["$feature/"+flag]) != want {
		t.Errorf("%s %s: reported %v / %v, served %s", e.DistinctID, flag, e.Properties["$feature_flag_response"],
			e.Properties["$feature/"+flag], want)
	}
	if _, isBool := e.Properties["$feature_flag_response"].(bool); isBool != (flag != "hero") {
		t.Errorf("%s %s: response %#v has the wrong JSON type", e.DistinctID, flag, e.Properties["$feature_flag_response"])
	}
	ids := map[string]float64{"checkout": 7, "hero": 8, "idle": 9}
	if e.Properties["locally_evaluated"] != true || e.Properties["$lib"] != "flagsplit" ||
		e.Properties["$feature_flag_id"] != ids[flag] || e.Properties["$geoip_disable"] != true {
		t.Errorf("%s %s: properties %v", e.DistinctID, flag, e.Properties)
	}
	if flag == "checkout" && e.Properties["$feature_flag_version"] != float64(50) {
		t.Errorf("checkout version %v, want 50", e.Properties["$feature_flag_version"])
	}
	if len(e.UUID) != 36 || e.Timestamp == "" {
		t.Errorf("event uuid %q timestamp %q", e.UUID, e.Timestamp)
	}
}

// eventsDelivered waits until the stand-in PostHog has at least n events and
// the sender has nothing left in flight: after that, no further event can
// arrive, so what the stand-in has is all there is.
func eventsDelivered(t *testing.T, ph *posthogtest.Server, n int) {
	t.Helper()
	eventually(t, 10*time.Second, fmt.Sprintf("%d exposure events", n), func() bool {
		events, _ := ph.Events()
		return len(events) >= n && eventsPending(t) == 0
	})
}

// eventsPending is what the admin API says is queued or in flight.
func eventsPending(t *testing.T) int {
	st := adminStatusOf(t, adminURL)
	if st.Events == nil {
		t.Fatal("the admin status has no events")
	}
	return st.Events.Pending
}

// TestExposureEventsFlushedOnReload checks that events waiting for their batch
// are sent when the config that queued them stops, whether the next config
// keeps the same event settings (the same sender, which must not hold the
// batch for its flush interval) or has none (the sender's final delivery).
func TestExposureEventsFlushedOnReload(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, eventsDefs(t))
	t.Cleanup(ph.Close)
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := t.TempDir()
	// Events wait for a full batch of 1000 or an hour: only a flush sends them.
	slow := "events on {\n flush_interval 1h\n batch_size 1000\n}"
	load(t, generousTimeout(postHogSite(storage, ph.URL, old, nu, slow, "")))
	eventually(t, 5*time.Second, "the definitions", func() bool { return adminReady(t) })
	send := func(prefix string, n int) {
		for i := 0; i < n; i++ {
			get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("%s-%d", prefix, i)})
		}
		eventually(t, 5*time.Second, "the events to be queued", func() bool { return eventsPending(t) == n })
	}
	send("kept", 20)
	if events, _ := ph.Events(); len(events) != 0 {
		t.Fatalf("%d events sent before the batch filled or the interval passed", len(events))
	}
	// A reload with identical event settings: the config that queued them
	// stops and has the sender send them now, without waiting for PostHog.
	load(t, generousTimeout(postHogSite(storage, ph.URL, old, nu, slow, "header X-Reloaded yes")))
	eventsDelivered(t, ph, 20)

	// A reload to a config without events: the sender's final delivery,
	// which the reload waits for (within its budget).
	send("dropped-settings", 20)
	load(t, generousTimeout(postHogSite(storage, ph.URL, old, nu, "", "")))
	if events, _ := ph.Events(); len(events) != 40 {
		t.Fatalf("after a reload without events: %d events delivered, want 40", len(events))
	}
}

// hungBatchSite is a site with events on whose PostHog requests are bounded by
// a 30 s timeout only, longer than any reload or shutdown deadline: what ends
// them early is the sender's deadline, nothing else.
func hungBatchSite(storage, host string, old, nu *upstream, siteExtra string) string {
	return generousTimeout(postHogSite(storage, host, old, nu, "events on {\n flush_interval 10ms\n batch_size 10\n}", siteExtra))
}

// queueWhileHung serves n new users while PostHog holds every /batch/ request,
// and returns once the sender has its four deliveries under way (the rest
// queued).
func queueWhileHung(t *testing.T, ph *posthogtest.Server, prefix string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("%s-%d", prefix, i)})
	}
	eventually(t, 5*time.Second, "the deliveries under way", func() bool {
		return eventsPending(t) == n && ph.BatchesInFlight() == posthog.DefaultMaxInFlight
	})
}

// The defect behind a reload that took 34 s while /batch/ hung: a reload that
// keeps the event settings does not wait for PostHog at all. It returns while
// PostHog still holds the requests (they are not cut either: the sender
// carries on with them), and once PostHog answers everything arrives.
func TestReloadWhileBatchHangsDoesNotWait(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, eventsDefs(t))
	t.Cleanup(ph.Close)
	release := ph.BlockBatches()
	t.Cleanup(release)
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := t.TempDir()
	load(t, hungBatchSite(storage, ph.URL, old, nu, ""))
	eventually(t, 5*time.Second, "the definitions", func() bool { return adminReady(t) })
	queueWhileHung(t, ph, "hung", 100)

	start := time.Now()
	load(t, hungBatchSite(storage, ph.URL, old, nu, "header X-Reloaded yes"))
	took := time.Since(start)
	// The positive signal: the reload is over and the deliveries it would
	// have waited for are still held by PostHog, untouched.
	if n := ph.BatchesInFlight(); n != posthog.DefaultMaxInFlight || ph.BatchesAbandoned() != 0 {
		t.Fatalf("after the reload: %d requests under way, %d given up", n, ph.BatchesAbandoned())
	}
	if took > 3*time.Second { // a guard beside the signal above
		t.Errorf("the reload took %v with /batch/ hanging", took)
	}
	release()
	eventsDelivered(t, ph, 100)
	if st := adminStatusOf(t, adminURL).Events; st.Dropped != 0 || st.Sent != 100 {
		t.Errorf("after PostHog answered: sent %d, dropped %d", st.Sent, st.Dropped)
	}
}

// The defect behind a shutdown that outlived its deadline while /batch/ hung:
// Caddy's Stop ends within the sender's budget because the requests under way
// are cancelled at its deadline (PostHog sees them given up), and every event
// not delivered is counted as dropped.
func TestShutdownWhileBatchHangsEndsAtTheDeadline(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, eventsDefs(t))
	t.Cleanup(ph.Close)
	release := ph.BlockBatches()
	t.Cleanup(release)
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := t.TempDir()
	load(t, hungBatchSite(storage, ph.URL, old, nu, ""))
	eventually(t, 5*time.Second, "the definitions", func() bool { return adminReady(t) })
	sent, dropped := metricValue(t, "caddy_feature_flags_events_sent_total"), metricValue(t, "caddy_feature_flags_events_dropped_total")
	queueWhileHung(t, ph, "stopped", 100)

	start := time.Now()
	if err := caddy.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	took := time.Since(start)
	// When Stop returned, the four requests had been cancelled and all 100
	// events counted as dropped.
	eventually(t, 5*time.Second, "PostHog to see the requests given up", func() bool {
		return ph.BatchesAbandoned() == posthog.DefaultMaxInFlight
	})
	if got := metricValue(t, "caddy_feature_flags_events_dropped_total") - dropped; got != 100 {
		t.Errorf("events_dropped_total rose by %v, want 100", got)
	}
	if got := metricValue(t, "caddy_feature_flags_events_sent_total") - sent; got != 0 {
		t.Errorf("events_sent_total rose by %v", got)
	}
	if took > 10*time.Second { // a guard beside the signals above; the budget is 4 s
		t.Errorf("stop took %v with /batch/ hanging", took)
	}
	t.Logf("stop took %v", took)
}

// TestReloadUnderSteadyTrafficWithEvents reloads while new users keep coming
// and PostHog's /batch/ takes 100 ms to answer: the reload must return within
// the README's 5 s, and every user's exposure must arrive exactly once.
func TestReloadUnderSteadyTrafficWithEvents(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, eventsDefs(t))
	t.Cleanup(ph.Close)
	ph.SetBatchDelay(100 * time.Millisecond)
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := t.TempDir()
	events := "events on {\n flush_interval 200ms\n batch_size 20\n}"
	load(t, generousTimeout(postHogSite(storage, ph.URL, old, nu, events, "")))
	eventually(t, 5*time.Second, "the definitions", func() bool { return adminReady(t) })

	// About 200 new users a second, each served once.
	var served atomic.Int64
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			req, _ := http.NewRequest(http.MethodGet, urlA, nil)
			req.Header.Set("X-POSTHOG-DISTINCT-ID", fmt.Sprintf("steady-%d", i))
			if resp, err := client.Do(req); err == nil {
				if resp.StatusCode == http.StatusOK {
					served.Add(1)
				}
				resp.Body.Close()
			}
		}
	}()
	stopTraffic := func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-done
	}
	defer stopTraffic()
	eventually(t, 10*time.Second, "traffic", func() bool { return served.Load() >= 300 })
	for round := 0; round < 3; round++ {
		start := time.Now()
		load(t, generousTimeout(postHogSite(storage, ph.URL, old, nu, events, fmt.Sprintf("header X-Round %d", round))))
		if took := time.Since(start); took > 5*time.Second {
			t.Errorf("reload %d under traffic took %v, more than the 5 s the README promises", round, took)
		} else {
			t.Logf("reload %d under traffic took %v", round, took)
		}
		target := served.Load() + 100
		eventually(t, 10*time.Second, "more traffic", func() bool { return served.Load() >= target })
	}
	stopTraffic()
	n := int(served.Load())
	eventsDelivered(t, ph, n)
	got, _ := ph.Events()
	seen := map[string]int{}
	for _, e := range got {
		if e.Properties["$feature_flag"] == "checkout" {
			seen[e.DistinctID]++
		}
	}
	if len(seen) != n {
		t.Errorf("%d users were served, %d have an exposure", n, len(seen))
	}
	for id, c := range seen {
		if c != 1 {
			t.Errorf("%s: %d exposures", id, c)
		}
	}
	if dropped := adminStatusOf(t, adminURL).Events.Dropped; dropped != 0 {
		t.Errorf("%d events dropped", dropped)
	}
}

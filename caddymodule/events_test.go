package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

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
	return postHogSite(storage, host, old, nu, "events "+mode+" {\n flush_interval 50ms\n batch_size 50\n}", `
	@hero_test feature_flag hero test
	@plan feature_flag needs-plan
	header @hero_test X-Hero test
	header @plan X-Plan yes`)
}

// TestExposureEventsReachPostHog sends requests through a real Caddy and checks
// the $feature_flag_called events the stand-in PostHog receives: one per user
// and routing flag, with the value the user was actually served, none for an
// undecided flag, none twice, and, after a reload to "events all", the flags
// that only travelled as headers too.
func TestExposureEventsReachPostHog(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, eventsDefs(t))
	defer ph.Close()
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := inProcessDir(t)
	tester := caddytest.NewTester(t)
	tester.InitServer(eventsSite(storage, ph.URL, "on", old, nu), "caddyfile")
	waitUntil(t, 5*time.Second, "the definitions", func() bool { return adminReady(t) })
	sentBefore := metricValue(t, "caddy_feature_flags_events_sent_total")

	const users = 150
	served := map[string]map[string]string{} // user -> flag -> value served
	for round := 0; round < 2; round++ {
		for i := 0; i < users; i++ {
			id := fmt.Sprintf("exposed-%d", i)
			resp, e := get(t, "http://127.0.0.1:9080/", map[string]string{"X-POSTHOG-DISTINCT-ID": id})
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
	waitUntil(t, 5*time.Second, "the exposure events", func() bool {
		events, _ := ph.Events()
		return len(events) >= 2*users
	})
	time.Sleep(200 * time.Millisecond) // let any surplus arrive
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
	tester.InitServer(eventsSite(storage, ph.URL, "all", old, nu), "caddyfile")
	for i := 0; i < users; i++ {
		get(t, "http://127.0.0.1:9080/", map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("exposed-%d", i)})
	}
	waitUntil(t, 5*time.Second, "the idle exposures", func() bool {
		events, _ := ph.Events()
		return len(events) >= 3*users
	})
	time.Sleep(200 * time.Millisecond)
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
	code, body := adminDo(t, http.MethodGet, "http://localhost:2999/feature_flags/", "")
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

// TestExposureEventsFlushedOnReload checks that events waiting for their batch
// are sent when the config that queued them stops, not lost with it.
func TestExposureEventsFlushedOnReload(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, eventsDefs(t))
	defer ph.Close()
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := inProcessDir(t)
	tester := caddytest.NewTester(t)
	// Events wait for a full batch of 1000 or an hour: only a flush sends them.
	tester.InitServer(postHogSite(storage, ph.URL, old, nu, "events on {\n flush_interval 1h\n batch_size 1000\n}", ""), "caddyfile")
	waitUntil(t, 5*time.Second, "the definitions", func() bool { return adminReady(t) })
	for i := 0; i < 20; i++ {
		get(t, "http://127.0.0.1:9080/", map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("flushed-%d", i)})
	}
	time.Sleep(100 * time.Millisecond)
	if events, _ := ph.Events(); len(events) != 0 {
		t.Fatalf("%d events sent before the batch filled or the interval passed", len(events))
	}
	// A reload to a config without events stops the old app, which flushes.
	tester.InitServer(postHogSite(storage, ph.URL, old, nu, "", ""), "caddyfile")
	waitUntil(t, 5*time.Second, "the flush", func() bool {
		events, _ := ph.Events()
		return len(events) == 20
	})
}

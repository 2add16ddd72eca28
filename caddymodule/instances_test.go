package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/flagsplit/flagsplit/posthog/posthogtest"
)

// Real Caddy processes (this test binary run as `caddy run`): two instances
// sharing one file-system storage, restarts, and a restart while PostHog is down.

func instanceConfig(adminPort, httpPort int, storage, posthogURL string, old, nu *upstream) string {
	return fmt.Sprintf(`{
	admin localhost:%d
	storage file_system %s
	skip_install_trust
	auto_https off
	grace_period 1ns
	feature_flags {
		posthog {
			host %s
			project_api_key %s
			personal_api_key %s
			poll_interval 200ms
			timeout 500ms
		}
		sync_interval 100ms
	}
}
:%d {
	feature_flags
	%s
}`, adminPort, storage, posthogURL, testProjectKey, testPersonalKey, httpPort, checkoutProxy(old, nu))
}

func adminStatusOf(t *testing.T, admin string) adminStatus {
	t.Helper()
	code, body := adminDo(t, http.MethodGet, admin+"/feature_flags/", "")
	var st adminStatus
	if code != http.StatusOK || json.Unmarshal([]byte(body), &st) != nil {
		t.Fatalf("status from %s: %d %s", admin, code, body)
	}
	return st
}

func TestOverridesAcrossInstancesAndRestarts(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, checkoutDefs(100))
	defer ph.Close()
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := t.TempDir()
	adminA, adminB, httpA, httpB := freePort(t), freePort(t), freePort(t), freePort(t)
	addrA, addrB := fmt.Sprintf("127.0.0.1:%d", httpA), fmt.Sprintf("127.0.0.1:%d", httpB)

	a := startCaddy(t, adminA, instanceConfig(adminA, httpA, storage, ph.URL, old, nu))
	b := startCaddy(t, adminB, instanceConfig(adminB, httpB, storage, ph.URL, old, nu))
	for _, addr := range []string{addrA, addrB} {
		waitUntil(t, 10*time.Second, addr+" to load definitions", func() bool { return routesTo(t, addr, 10) == "new" })
	}

	// Kill switch on A: A obeys at once, B within its sync interval.
	if code, body := adminDo(t, http.MethodPut, a.admin+"/feature_flags/overrides/checkout", `{"killed": true}`); code != http.StatusOK {
		t.Fatalf("PUT on A: %d %s", code, body)
	}
	if got := routesTo(t, addrA, 20); got != "old" {
		t.Fatalf("A after its own kill switch: %s", got)
	}
	start := time.Now()
	waitUntil(t, 5*time.Second, "B to converge on the kill switch", func() bool { return routesTo(t, addrB, 10) == "old" })
	t.Logf("B converged %v after the override was set on A", time.Since(start).Round(time.Millisecond))

	// Restart A: the override comes back from storage.
	a.stop()
	a = startCaddyConfig(t, adminA, a.config)
	waitUntil(t, 10*time.Second, "A to serve after the restart", func() bool { return adminStatusOf(t, a.admin).Ready })
	if got := routesTo(t, addrA, 20); got != "old" {
		t.Fatalf("A after a restart: %s", got)
	}
	if st := adminStatusOf(t, a.admin); !st.Overrides["checkout"].Killed {
		t.Errorf("A's status lacks the override: %+v", st.Overrides)
	}

	// Clear it on B: both converge back.
	if code, body := adminDo(t, http.MethodDelete, b.admin+"/feature_flags/overrides/checkout", ""); code != http.StatusOK {
		t.Fatalf("DELETE on B: %d %s", code, body)
	}
	waitUntil(t, 5*time.Second, "A to converge on the cleared override", func() bool { return routesTo(t, addrA, 10) == "new" })

	// Restart A while PostHog is unreachable: the last-known-good copy in
	// storage serves.
	a.stop()
	ph.Close()
	a = startCaddyConfig(t, adminA, a.config)
	waitUntil(t, 10*time.Second, "A to serve the stored copy", func() bool { return adminStatusOf(t, a.admin).Ready })
	st := adminStatusOf(t, a.admin)
	if st.Source.Kind != "storage" || st.FlagCount != 3 {
		t.Errorf("source after a restart with PostHog down: %+v (%d flags)", st.Source, st.FlagCount)
	}
	if got := routesTo(t, addrA, 20); got != "new" {
		t.Fatalf("A with PostHog down: %s", got)
	}
	_ = b
}

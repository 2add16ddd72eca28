package caddymodule

import (
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/flagsplit/flagsplit/posthog/posthogtest"
)

// Real Caddy processes (this test binary run as `caddy run`): two instances
// sharing one file-system storage, restarts, and a restart while PostHog is down.

func instanceConfig(storage, posthogURL string, old, nu *upstream) string {
	return fmt.Sprintf(`{
	%s
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
%s
	feature_flags
	%s
}`, childAdmin, storage, posthogURL, testProjectKey, testPersonalKey, childSite, checkoutProxy(old, nu))
}

func TestOverridesAcrossInstancesAndRestarts(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, checkoutDefs(100))
	t.Cleanup(ph.Close)
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := t.TempDir()
	portsA, portsB := reservePorts(t), reservePorts(t)
	a := startCaddy(t, portsA, instanceConfig(storage, ph.URL, old, nu))
	b := startCaddy(t, portsB, instanceConfig(storage, ph.URL, old, nu))
	for _, addr := range []string{portsA.siteAddr, portsB.siteAddr} {
		eventually(t, 10*time.Second, addr+" to load definitions", func() bool { return routesTo(t, addr, 10) == "new" })
	}

	// Kill switch on A: A obeys at once, B within its sync interval.
	if code, body := adminDo(t, http.MethodPut, portsA.adminURL+"/feature_flags/overrides/checkout", `{"killed": true}`); code != http.StatusOK {
		t.Fatalf("PUT on A: %d %s", code, body)
	}
	if got := routesTo(t, portsA.siteAddr, 20); got != "old" {
		t.Fatalf("A after its own kill switch: %s", got)
	}
	start := time.Now()
	eventually(t, 5*time.Second, "B to converge on the kill switch", func() bool { return routesTo(t, portsB.siteAddr, 10) == "old" })
	t.Logf("B converged %v after the override was set on A", time.Since(start).Round(time.Millisecond))

	// Restart A: the override comes back from storage.
	a.stop()
	a = restartCaddy(t, portsA, a.config)
	eventually(t, 10*time.Second, "A to serve after the restart", func() bool { return adminStatusOf(t, portsA.adminURL).Ready })
	if got := routesTo(t, portsA.siteAddr, 20); got != "old" {
		t.Fatalf("A after a restart: %s", got)
	}
	if st := adminStatusOf(t, portsA.adminURL); !st.Overrides["checkout"].Killed || st.OverridesRevision == 0 {
		t.Errorf("A's status lacks the override: %+v (revision %d)", st.Overrides, st.OverridesRevision)
	}

	// Clear it on B: both converge back.
	if code, body := adminDo(t, http.MethodDelete, portsB.adminURL+"/feature_flags/overrides/checkout", ""); code != http.StatusOK {
		t.Fatalf("DELETE on B: %d %s", code, body)
	}
	eventually(t, 5*time.Second, "A to converge on the cleared override", func() bool { return routesTo(t, portsA.siteAddr, 10) == "new" })
	b.stop()

	// Restart A while PostHog is unreachable: the last-known-good copy in
	// storage serves.
	a.stop()
	ph.Close()
	restartCaddy(t, portsA, a.config)
	eventually(t, 10*time.Second, "A to serve the stored copy", func() bool { return adminStatusOf(t, portsA.adminURL).Ready })
	st := adminStatusOf(t, portsA.adminURL)
	if st.Source.Kind != string(sourceStored) || st.FlagCount != 3 {
		t.Errorf("source after a restart with PostHog down: %+v (%d flags)", st.Source, st.FlagCount)
	}
	if got := routesTo(t, portsA.siteAddr, 20); got != "new" {
		t.Fatalf("A with PostHog down: %s", got)
	}
}

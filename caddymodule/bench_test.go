package caddymodule

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
)

// Benchmarks of the handler alone: no network, no Caddy server, one request
// through the feature_flags handler and the feature_flag selection policy.
//
//	go test -run '^$' -bench Handler -benchmem ./caddymodule/
//
// Each iteration also pays for what Caddy's server does for every request
// (building the request context, replacer and vars); BenchmarkHandler/caddy-setup
// measures that part alone, so the handler's own cost is the difference.

// benchDefinitions returns n flags: a rollout, a multivariate flag, then flags
// with property filters, repeated.
func benchDefinitions(n int) []byte {
	var flags []string
	for i := 0; i < n; i++ {
		key := "flag-" + strconv.Itoa(i)
		var filters string
		switch i % 5 {
		case 0:
			filters = `{"groups": [{"rollout_percentage": 45}]}`
		case 1:
			filters = `{"groups": [{"rollout_percentage": 100}], "multivariate": {"variants": [
				{"key": "control", "rollout_percentage": 50}, {"key": "b", "rollout_percentage": 25}, {"key": "c", "rollout_percentage": 25}]}}`
		case 2:
			filters = `{"groups": [{"properties": [{"key": "plan", "value": ["pro", "enterprise"]}], "rollout_percentage": 50}]}`
		case 3:
			filters = `{"groups": [{"properties": [{"key": "country", "operator": "is_not", "value": "FR"}, {"key": "orders", "operator": "gte", "value": 5}]}]}`
		case 4:
			filters = `{"groups": [{"properties": [{"key": "app_version", "operator": "semver_gte", "value": "2.0.0"}], "rollout_percentage": 80}]}`
		}
		flags = append(flags, fmt.Sprintf(`{"id": %d, "key": %q, "active": true, "filters": %s}`, i+1, key, filters))
	}
	return []byte(`{"flags": [` + strings.Join(flags, ",") + `]}`)
}

func BenchmarkHandler(b *testing.B) {
	ids := make([]string, 4096)
	for i := range ids {
		ids[i] = "user-" + strconv.Itoa(100000+i)
	}
	pool := reverseproxy.UpstreamPool{{Dial: "old:8080"}, {Dial: "new:8080"}}
	w := &discardWriter{h: http.Header{}}

	b.Run("caddy-setup", func(b *testing.B) {
		next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error { return nil })
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			r := prepare(w, ids[i&4095])
			_ = next.ServeHTTP(w, r)
		}
	})
	for _, c := range []struct {
		flags   int
		rollout bool
		headers string
	}{{1, false, ""}, {5, false, ""}, {50, false, ""}, {5, true, ""},
		{5, false, "dictionary"}, {50, false, "dictionary"}, {5, false, "off"}, {50, false, "off"}} {
		name := fmt.Sprintf("flags-%d", c.flags)
		if c.rollout {
			name += "-rollout"
		}
		if c.headers != "" {
			name += "-" + c.headers
		}
		b.Run(name, func(b *testing.B) {
			app := newTestApp(b, benchDefinitions(c.flags), DefaultCacheSize)
			if c.rollout {
				// flag-0 ramped at 25 % with both guardrails: every response
				// is observed.
				startTestRollout(b, app, &RolloutConfig{Flag: "flag-0", Steps: []float64{25, 100}, Guardrails: []GuardrailConfig{
					{Metric: "error_rate", Factor: 2}, {Metric: "latency", Quantile: 0.99, Margin: caddy.Duration(250e6)}}})
			}
			h := newTestHandler(b, app)
			if c.headers != "" {
				h.Headers = c.headers
				if err := h.setup(app.App, zap.NewNop()); err != nil {
					b.Fatal(err)
				}
			}
			p := newTestPolicy(b, app, "flag-0")
			next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				if p.Select(pool, r, w) == nil {
					return fmt.Errorf("no upstream")
				}
				w.WriteHeader(http.StatusOK)
				return nil
			})
			// Steady state: every visitor has been seen once (cached).
			for _, id := range ids {
				if err := h.ServeHTTP(w, prepare(w, id), next); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				r := prepare(w, ids[i&4095])
				if err := h.ServeHTTP(w, r, next); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

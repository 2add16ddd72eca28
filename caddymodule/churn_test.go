package caddymodule

import (
	"net/http"
	"runtime"
	"strconv"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
)

// TestMemoryStaysBoundedUnderChurn sends 1,000,000 distinct ids (200,000 under
// the race detector) through the handler and the selection policy with
// cache_size 10000: the heap after the churn must be what it was after the
// first 100,000, give or take, not grow with the number of ids.
func TestMemoryStaysBoundedUnderChurn(t *testing.T) {
	total := 1_000_000
	if raceEnabled {
		total = 200_000
	}
	const cacheSize = 10_000
	app := newTestApp(t, benchDefinitions(50), cacheSize)
	app.engine.cache.SetMinCost(0) // cache these 50 cheap flags: the bound is what is tested
	h := newTestHandler(t, app)
	p := newTestPolicy(t, app, "flag-0")
	pool := reverseproxy.UpstreamPool{{Dial: "old:8080"}, {Dial: "new:8080"}}
	w := &discardWriter{h: http.Header{}}
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if p.Select(pool, r, w) == nil {
			t.Fatal("no upstream selected")
		}
		w.WriteHeader(http.StatusOK)
		return nil
	})
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	var afterWarmup uint64
	for i := 0; i < total; i++ {
		if err := h.ServeHTTP(w, prepare(w, "churn-user-"+strconv.Itoa(i)), next); err != nil {
			t.Fatal(err)
		}
		if i+1 == 100_000 {
			afterWarmup = heap()
		}
	}
	final := heap()
	_, misses, entries := app.engine.cache.Stats()
	t.Logf("%d distinct ids, cache_size %d: heap %.1f MiB after 100,000 ids, %.1f MiB after %d; %d cache entries, %d misses",
		total, cacheSize, float64(afterWarmup)/(1<<20), float64(final)/(1<<20), total, entries, misses)
	if entries > cacheSize {
		t.Errorf("%d cache entries with cache_size %d", entries, cacheSize)
	}
	if misses != uint64(total) {
		t.Errorf("%d misses for %d distinct ids", misses, total)
	}
	// Allow for noise, not for growth with the number of ids.
	if final > afterWarmup+4<<20 {
		t.Errorf("heap grew from %d to %d bytes between 100,000 and %d ids", afterWarmup, final, total)
	}
	if final > 64<<20 {
		t.Errorf("heap %d bytes after the churn", final)
	}
}

package proxy

import (
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/flagsplit/flagsplit/eval"
)

func TestExposuresReportOncePerWindow(t *testing.T) {
	x := NewExposures(time.Minute, 0)
	t0 := time.Now()
	if !x.First("u1", "checkout", "true", nil, t0) {
		t.Fatal("first exposure not reported")
	}
	if x.First("u1", "checkout", "true", nil, t0.Add(time.Second)) {
		t.Error("repeat within the window reported")
	}
	// A different value, flag, user or group set is a different exposure.
	for _, c := range []struct {
		id, flag, value string
		groups          []eval.Group
	}{
		{"u1", "checkout", "false", nil},
		{"u1", "hero", "true", nil},
		{"u2", "checkout", "true", nil},
		{"u1", "checkout", "true", []eval.Group{{Type: "company", Key: "acme"}}},
		{"u1", "checkout", "true", []eval.Group{{Type: "company", Key: "globex"}}},
		// Field boundaries matter: ("u1c", "heckout") is not ("u1", "checkout").
		{"u1c", "heckout", "true", nil},
	} {
		if !x.First(c.id, c.flag, c.value, c.groups, t0.Add(2*time.Second)) {
			t.Errorf("%+v treated as a repeat", c)
		}
	}
	// Still remembered one window later (it survives one rotation) ...
	if x.First("u1", "checkout", "true", nil, t0.Add(time.Minute+time.Second)) {
		t.Error("repeat one window later, before the second rotation, reported")
	}
	// ... and forgotten once two windows have passed without it.
	if !x.First("u1", "checkout", "true", nil, t0.Add(3*time.Minute)) {
		t.Error("exposure not reported again after two windows")
	}
}

func TestExposuresMemoryIsBounded(t *testing.T) {
	const limit = 3200 // 100 per shard
	x := NewExposures(time.Hour, limit)
	now := time.Now()
	for i := 0; i < 100*limit; i++ {
		x.First("user-"+strconv.Itoa(i), "checkout", "true", nil, now)
	}
	total := 0
	for i := range x.shards {
		s := &x.shards[i]
		total += len(s.current) + len(s.previous)
	}
	if total > 2*limit {
		t.Errorf("%d exposures remembered, bound is %d", total, 2*limit)
	}
	// The most recent ones are still remembered.
	if x.First("user-"+strconv.Itoa(100*limit-1), "checkout", "true", nil, now) {
		t.Error("the latest exposure was forgotten")
	}
}

func TestExposuresConcurrentFirstIsUnique(t *testing.T) {
	x := NewExposures(time.Hour, 0)
	now := time.Now()
	var wg sync.WaitGroup
	var mu sync.Mutex
	firsts := map[string]int{}
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 500; i++ {
				id := "user-" + strconv.Itoa(i)
				if x.First(id, "checkout", "true", nil, now) {
					mu.Lock()
					firsts[id]++
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	if len(firsts) != 500 {
		t.Errorf("%d distinct users reported, want 500", len(firsts))
	}
	for id, n := range firsts {
		if n != 1 {
			t.Errorf("%s reported %d times", id, n)
		}
	}
}

func BenchmarkExposuresRepeat(b *testing.B) {
	x := NewExposures(time.Hour, 0)
	now := time.Now()
	x.First("0190a3c4-7d2e-7b1a-9c3d-4e5f60718293", "new-checkout-flow", "true", nil, now)
	b.ReportAllocs()
	for b.Loop() {
		x.First("0190a3c4-7d2e-7b1a-9c3d-4e5f60718293", "new-checkout-flow", "true", nil, now)
	}
}

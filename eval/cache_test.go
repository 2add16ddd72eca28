package eval

import (
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

const cacheTestDefs = `{"flags": [
	{"key": "roll", "active": true, "filters": {"groups": [{"rollout_percentage": 50}]}},
	{"key": "mv", "active": true, "filters": {"groups": [{"properties": [{"key": "plan", "value": "pro"}]}],
		"multivariate": {"variants": [{"key": "a", "rollout_percentage": 50}, {"key": "b", "rollout_percentage": 50}]}}},
	{"key": "recent", "active": true, "filters": {"groups": [{"properties": [{"key": "signup", "operator": "is_date_after", "value": "-1h"}]}]}}
]}`

// newTestCache caches every set, however cheap, so small test sets exercise
// the cache.
func newTestCache(size int) *Cache {
	c := NewCache(size)
	c.SetMinCost(0)
	return c
}

// evaluate is Cache.Evaluate returning the results.
func evaluate(c *Cache, set *FlagSet, s *Subject) Results {
	var r Results
	c.Evaluate(set, s, &r)
	return r
}

func sameAsDirect(t *testing.T, d *Definitions, res Results, s *Subject) {
	t.Helper()
	for i := 0; i < res.Len(); i++ {
		want := d.Evaluate(res.Key(i), s)
		got := res.At(i)
		if got.Enabled != want.Enabled || got.Variant != want.Variant || got.Reason != want.Reason || res.Value(i) != want.Value() {
			t.Fatalf("%s for %s: cached %s/%s, direct %s/%s", res.Key(i), s.DistinctID, got.Value(), got.Reason, want.Value(), want.Reason)
		}
	}
}

func TestCacheAnswersLikeDirectEvaluation(t *testing.T) {
	st := NewStore()
	st.Swap(mustParse(t, cacheTestDefs))
	d := st.Load()
	set := d.FlagSet(nil)
	c := newTestCache(1000)
	now := time.Date(2022, 1, 1, 1, 0, 0, 0, time.UTC)
	for pass := 0; pass < 2; pass++ {
		for i := 0; i < 200; i++ {
			plan := "free"
			if i%3 == 0 {
				plan = "pro"
			}
			s := &Subject{DistinctID: "u" + strconv.Itoa(i), Now: now,
				Person: Properties{{Key: "plan", Value: String(plan)}, {Key: "signup", Value: String("2022-01-01T00:30:00Z")}}}
			sameAsDirect(t, d, evaluate(c, set, s), s)
		}
	}
	hits, misses, entries := c.Stats()
	if hits != 200 || misses != 200 || entries != 200 {
		t.Errorf("hits %d misses %d entries %d, want 200/200/200", hits, misses, entries)
	}
}

func TestCacheKeysOnPropertiesAndGeneration(t *testing.T) {
	st := NewStore()
	st.Swap(mustParse(t, cacheTestDefs))
	c := newTestCache(100)
	pro := &Subject{DistinctID: "same", Person: Properties{{Key: "plan", Value: String("pro")}}}
	free := &Subject{DistinctID: "same", Person: Properties{{Key: "plan", Value: String("free")}}}
	set := st.Load().FlagSet([]string{"mv"})
	if r := evaluate(c, set, pro); !r.At(0).Enabled {
		t.Fatal("pro plan should match")
	}
	if r := evaluate(c, set, free); r.At(0).Enabled {
		t.Fatal("a cached answer for other properties was served")
	}
	// Same subject, new definitions: the old entry must not be served.
	st.Swap(mustParse(t, `{"flags": [{"key": "mv", "active": false}]}`))
	set = st.Load().FlagSet([]string{"mv"})
	if r := evaluate(c, set, pro); r.At(0).Enabled || r.Reason(0) != ReasonDisabled {
		t.Fatalf("stale answer after a swap: %s %s", r.Value(0), r.Reason(0))
	}
}

func TestCacheRecomputesClockDependentFlags(t *testing.T) {
	st := NewStore()
	st.Swap(mustParse(t, cacheTestDefs))
	set := st.Load().FlagSet([]string{"recent", "roll"})
	c := newTestCache(10)
	props := Properties{{Key: "signup", Value: String("2022-01-01T00:30:00Z")}}
	early := &Subject{DistinctID: "u", Person: props, Now: time.Date(2022, 1, 1, 1, 0, 0, 0, time.UTC)}
	late := &Subject{DistinctID: "u", Person: props, Now: time.Date(2022, 1, 1, 2, 0, 0, 0, time.UTC)}
	if r := evaluate(c, set, early); !r.At(0).Enabled {
		t.Fatal("signed up 30 minutes ago: should be recent")
	}
	r := evaluate(c, set, late)
	if r.At(0).Enabled {
		t.Fatal("served a cached relative-date answer after the clock moved")
	}
	if hits, _, _ := c.Stats(); hits != 1 {
		t.Errorf("the second call should still be a cache hit, hits=%d", hits)
	}
}

func TestCacheIsBounded(t *testing.T) {
	st := NewStore()
	st.Swap(mustParse(t, cacheTestDefs))
	set := st.Load().FlagSet(nil)
	c := newTestCache(100)
	for i := 0; i < 10000; i++ {
		evaluate(c, set, &Subject{DistinctID: strconv.Itoa(i)})
	}
	if _, _, entries := c.Stats(); entries > 100 {
		t.Errorf("%d entries in a cache of 100", entries)
	}
	c.Purge()
	if _, _, entries := c.Stats(); entries != 0 {
		t.Errorf("%d entries after Purge", entries)
	}
	// A disabled cache still answers.
	off := NewCache(0)
	s := &Subject{DistinctID: "x"}
	sameAsDirect(t, st.Load(), evaluate(off, set, s), s)
}

func TestCacheAndStoreUnderConcurrency(t *testing.T) {
	st := NewStore()
	a := mustParse(t, cacheTestDefs)
	b := mustParse(t, `{"flags": [{"key": "roll", "active": false}, {"key": "mv", "active": false}, {"key": "recent", "active": false}]}`)
	st.Swap(a)
	sel := NewSelection(nil)
	c := newTestCache(64)
	// The swapper changes the definitions for as long as the readers run.
	var swapper, readers sync.WaitGroup
	stop := make(chan struct{})
	swaps := 0
	swapper.Add(1)
	go func() {
		defer swapper.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				swaps = i
				return
			default:
			}
			if i%2 == 0 {
				st.Swap(b)
			} else {
				st.Swap(a)
			}
			runtime.Gosched()
		}
	}()
	for w := 0; w < 4; w++ {
		readers.Add(1)
		go func(w int) {
			defer readers.Done()
			for i := 0; i < 3000; i++ {
				d := st.Load()
				s := &Subject{DistinctID: strconv.Itoa(i % 150), Person: Properties{{Key: "plan", Value: String("pro")}}}
				res := evaluate(c, sel.For(d), s)
				sameAsDirect(t, d, res, s)
			}
		}(w)
	}
	readers.Wait()
	close(stop)
	swapper.Wait()
	if swaps < 2 {
		t.Errorf("the definitions changed %d times while the readers ran", swaps)
	}
}

func TestSelectionRebindsOnNewDefinitions(t *testing.T) {
	st := NewStore()
	st.Swap(mustParse(t, cacheTestDefs))
	sel := NewSelection([]string{"roll", "nope"})
	d1 := st.Load()
	fs1 := sel.For(d1)
	if sel.For(d1) != fs1 {
		t.Error("the same definitions should reuse the bound set")
	}
	if fs1.Flags()[1] != nil || fs1.Keys()[1] != "nope" {
		t.Error("an undefined key must stay in the set as nil")
	}
	var r Results
	fs1.Evaluate(&Subject{DistinctID: "u"}, &r)
	if r.At(1).Reason != ReasonUnknownFlag || r.Value(1) != "false" || r.Index("nope") != 1 || r.Index("zzz") != -1 {
		t.Errorf("unknown key result: %+v", r.At(1))
	}
	st.Swap(mustParse(t, cacheTestDefs))
	if fs2 := sel.For(st.Load()); fs2 == fs1 || fs2.Definitions() != st.Load() {
		t.Error("the selection did not rebind to the new definitions")
	}
}

func TestCheapSetsAreNotCached(t *testing.T) {
	st := NewStore()
	st.Swap(mustParse(t, cacheTestDefs))
	cheap := st.Load().FlagSet([]string{"roll"})
	c := NewCache(100)
	if cheap.Cost() >= c.MinCost() {
		t.Fatalf("a single rollout flag is estimated at %d ns", cheap.Cost())
	}
	s := &Subject{DistinctID: "u"}
	for i := 0; i < 3; i++ {
		sameAsDirect(t, st.Load(), evaluate(c, cheap, s), s)
	}
	if hits, misses, entries := c.Stats(); hits+misses+uint64(entries) != 0 {
		t.Errorf("a cheap set went through the cache: %d hits, %d misses, %d entries", hits, misses, entries)
	}
	if fifty := mustParse(t, fiftyFlags()).FlagSet(nil); fifty.Cost() >= c.MinCost() {
		t.Errorf("50 simple flags estimated at %d ns: cached by default", fifty.Cost())
	}
	st.Swap(mustParse(t, regexFlags(200)))
	costly := st.Load().FlagSet(nil)
	if costly.Cost() < c.MinCost() {
		t.Fatalf("200 regex flags estimated at only %d ns", costly.Cost())
	}
	evaluate(c, costly, s)
	evaluate(c, costly, s)
	if hits, misses, _ := c.Stats(); hits != 1 || misses != 1 {
		t.Errorf("50 flags: %d hits, %d misses", hits, misses)
	}
}

// regexFlags returns n flags each matching a regex and rolling out to half.
func regexFlags(n int) string {
	flags := make([]string, n)
	for i := range flags {
		flags[i] = fmt.Sprintf(`{"key": "re-%d", "active": true, "filters": {"groups": [{"properties": [{"key": "path", "operator": "regex", "value": "^/section-%d/"}], "rollout_percentage": 50}]}}`, i, i)
	}
	return `{"flags": [` + strings.Join(flags, ",") + `]}`
}

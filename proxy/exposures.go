package proxy

import (
	"hash/maphash"
	"sync"
	"time"

	"github.com/flagsplit/flagsplit/eval"
)

// Exposure-deduplication defaults.
const (
	DefaultDedupWindow = time.Hour
	// DefaultDedupEntries bounds the exposures remembered per generation;
	// two generations are kept, so at most twice this many.
	DefaultDedupEntries = 100000
)

// exposureShards spreads the remembered exposures over independently locked
// maps so that concurrent requests rarely wait on each other.
const exposureShards = 32

// Exposures remembers which (distinct id, flag, value, groups) combinations were
// reported recently, so that each is reported at most once per window.
//
// It keeps two generations of 64-bit fingerprints and retires the older one
// every window: a combination seen at time t is remembered until at least
// t+window and at most t+2·window. A generation that fills up before its
// window ends is retired early, which bounds memory whatever the number of
// users at the price of an occasional repeat, as PostHog's own SDKs do with
// their size-limited maps.
type Exposures struct {
	window     time.Duration
	maxEntries int
	seed       maphash.Seed
	shards     [exposureShards]exposureShard
}

type exposureShard struct {
	mu       sync.Mutex
	current  map[uint64]struct{}
	previous map[uint64]struct{}
	rotated  time.Time
}

// NewExposures returns an empty filter; window ≤ 0 and maxEntries ≤ 0 take the
// defaults.
func NewExposures(window time.Duration, maxEntries int) *Exposures {
	if window <= 0 {
		window = DefaultDedupWindow
	}
	if maxEntries <= 0 {
		maxEntries = DefaultDedupEntries
	}
	x := &Exposures{window: window, maxEntries: max(maxEntries/exposureShards, 1), seed: maphash.MakeSeed()}
	now := time.Now()
	for i := range x.shards {
		x.shards[i].current = map[uint64]struct{}{}
		x.shards[i].rotated = now
	}
	return x
}

// Window is how long a reported exposure suppresses repeats, at least.
func (x *Exposures) Window() time.Duration { return x.window }

// First reports whether this exposure is new within the window, and remembers
// it. groups must be in a stable order (the handler sorts them by type).
func (x *Exposures) First(distinctID, flag, value string, groups []eval.Group, now time.Time) bool {
	var h maphash.Hash
	h.SetSeed(x.seed)
	// Separators keep ("ab","c") and ("a","bc") apart.
	h.WriteString(distinctID)
	h.WriteByte(0)
	h.WriteString(flag)
	h.WriteByte(0)
	h.WriteString(value)
	for _, g := range groups {
		h.WriteByte(1)
		h.WriteString(g.Type)
		h.WriteByte(0)
		h.WriteString(g.Key)
	}
	key := h.Sum64()

	s := &x.shards[key%exposureShards]
	s.mu.Lock()
	defer s.mu.Unlock()
	if now.Sub(s.rotated) >= x.window {
		if now.Sub(s.rotated) >= 2*x.window {
			s.previous = nil // both generations are older than the window
		} else {
			s.previous = s.current
		}
		s.current = make(map[uint64]struct{}, len(s.current))
		s.rotated = now
	}
	if _, ok := s.current[key]; ok {
		return false
	}
	if _, ok := s.previous[key]; ok {
		return false
	}
	if len(s.current) >= x.maxEntries {
		s.previous = s.current
		s.current = make(map[uint64]struct{}, x.maxEntries)
		s.rotated = now
	}
	s.current[key] = struct{}{}
	return true
}

package eval

import (
	"encoding/binary"
	"hash/maphash"
	"strings"
	"sync/atomic"

	lru "github.com/hashicorp/golang-lru/v2"
)

// FlagSet is the list of flags a caller evaluates, bound to one Definitions.
type FlagSet struct {
	defs  *Definitions
	keys  []string
	flags []*Flag // nil where the definitions lack the key
	id    uint64
	// clock lists positions whose flags depend on the wall clock; cached
	// answers for them are recomputed on every hit.
	clock []int
	// cost estimates evaluating the whole set, in nanoseconds.
	cost int
}

// DefaultMinCost is the estimated evaluation time (ns) from which a flag set's
// answers are cached. Below it, evaluating on every request is cheaper than a
// cache lookup plus what a large live cache costs the garbage collector: in
// bench/proxy.sh, with 100,000 subjects cached, a proxy evaluating five flags
// served fewer requests than one evaluating them every time, and one
// evaluating fifty the same number with a worse p99.
const DefaultMinCost = 10000

// FlagSet binds keys to these definitions. A nil keys selects every flag.
func (d *Definitions) FlagSet(keys []string) *FlagSet {
	fs := &FlagSet{defs: d}
	var h maphash.Hash
	h.SetSeed(flagSetSeed)
	if keys == nil {
		fs.keys = make([]string, len(d.flags))
		fs.flags = d.flags
		for i, f := range d.flags {
			fs.keys[i] = f.Key
		}
		h.WriteString("\x00all")
	} else {
		fs.keys = append([]string(nil), keys...)
		fs.flags = make([]*Flag, len(keys))
		for i, k := range keys {
			fs.flags[i] = d.byKey[k]
			h.WriteString(k)
			h.WriteByte(0)
		}
	}
	fs.id = h.Sum64()
	cost := 0
	for i, f := range fs.flags {
		if f == nil {
			continue
		}
		if f.usesClock {
			fs.clock = append(fs.clock, i)
		}
		cost += f.cost
	}
	fs.cost = cost
	return fs
}

// Cost estimates evaluating the whole set, in nanoseconds.
func (fs *FlagSet) Cost() int { return fs.cost }

// flagSetSeed only has to be stable within a process: set ids are compared, not
// stored.
var flagSetSeed = maphash.MakeSeed()

// Definitions returns the definitions the set is bound to.
func (fs *FlagSet) Definitions() *Definitions { return fs.defs }

// Keys returns the flag keys of the set, in order.
func (fs *FlagSet) Keys() []string { return fs.keys }

// Flags returns the flags of the set; an entry is nil for an undefined key.
func (fs *FlagSet) Flags() []*Flag { return fs.flags }

// Values lists the values flag i of the set can take, indexed like
// Results.ValueIndex: "false", "true", then the variants.
func (fs *FlagSet) Values(i int) []string {
	vals := []string{"false", "true"}
	if f := fs.flags[i]; f != nil {
		for _, v := range f.variants {
			vals = append(vals, v.key)
		}
	}
	return vals
}

// Len returns the number of flags in the set.
func (fs *FlagSet) Len() int { return len(fs.keys) }

// Evaluate evaluates every flag of the set for s into r, reusing r's storage.
func (fs *FlagSet) Evaluate(s *Subject, r *Results) {
	r.set = fs
	r.answers = fs.evaluate(s, r.buffer(len(fs.flags)))
	r.own = r.answers
}

func (fs *FlagSet) evaluate(s *Subject, dst []answer) []answer {
	e := evaluation{defs: fs.defs, subj: s}
	for _, f := range fs.flags {
		if f == nil {
			dst = append(dst, inconclusive(ReasonUnknownFlag))
			continue
		}
		dst = append(dst, e.flag(f, false))
	}
	e.release()
	return dst
}

// Results are the answers for a FlagSet. Their answers may be shared with the
// Cache (and other requests); read them with At and friends. A Results reused
// from request to request keeps its own storage for answers it computes.
type Results struct {
	set     *FlagSet
	answers []answer
	own     []answer // storage owned by this Results, never shared
	inline  [8]answer
}

// buffer returns empty storage owned by r for n answers.
func (r *Results) buffer(n int) []answer {
	if cap(r.own) >= n {
		return r.own[:0]
	}
	if n <= len(r.inline) {
		return r.inline[:0]
	}
	return make([]answer, 0, n)
}

// Len returns the number of results.
func (r *Results) Len() int { return len(r.answers) }

// Set returns the flag set the results answer.
func (r *Results) Set() *FlagSet { return r.set }

// Key returns the flag key of result i.
func (r *Results) Key(i int) string { return r.set.keys[i] }

// At returns result i.
func (r *Results) At(i int) Result {
	f := r.set.flags[i]
	if f == nil {
		return Result{Key: r.set.keys[i], Reason: ReasonUnknownFlag, Condition: -1}
	}
	return f.result(r.answers[i])
}

// Value returns the value of result i as PostHog spells it ("true", "false" or
// the variant) without building a Result.
func (r *Results) Value(i int) string {
	a := r.answers[i]
	switch {
	case a.reason.Inconclusive() || !a.enabled:
		return "false"
	case a.variant >= 0:
		return r.set.flags[i].variants[a.variant].key
	}
	return "true"
}

// ValueIndex returns result i's value as an index into FlagSet.Values(i):
// 0 for false (and for every inconclusive result), 1 for true, 2+k for variant k.
func (r *Results) ValueIndex(i int) int {
	a := r.answers[i]
	switch {
	case a.reason.Inconclusive() || !a.enabled:
		return 0
	case a.variant >= 0:
		return 2 + int(a.variant)
	}
	return 1
}

// Reason returns the reason of result i.
func (r *Results) Reason(i int) Reason { return r.answers[i].reason }

// Index returns the position of key in the results, or -1.
func (r *Results) Index(key string) int {
	for i, k := range r.set.keys {
		if k == key {
			return i
		}
	}
	return -1
}

// Cache is a bounded, sharded LRU of evaluation results. An entry is keyed by the
// definitions' generation, the flag set, the distinct id and a fingerprint of the
// rest of the subject (device id, person and group properties), so swapping
// definitions or overrides makes old entries unreachable without a flush; the LRU
// bound reclaims them. Shards keep concurrent requests off a single lock.
type Cache struct {
	// minCost is the estimated evaluation cost (ns, see FlagSet.Cost) from
	// which a set's answers are cached; cheaper sets are evaluated every time.
	minCost atomic.Int64

	shards []cacheShard
	mask   uint64 // len(shards)-1; the shard count is a power of two
	seed   maphash.Seed
}

type cacheShard struct {
	lru    *lru.Cache[uint64, cacheEntry]
	hits   atomic.Uint64
	misses atomic.Uint64
	_      [40]byte // keep shards' counters on separate cache lines
}

// An entry is found by one 64-bit key (the map's fastest path) mixing the
// definitions generation, the flag set and the subject fingerprint. The entry
// repeats the generation, set and distinct id, and a hit is only taken when all
// three match, so neither two users nor two definition sets can share an entry.
// It is stored by value in the LRU's list element: one object fewer per entry
// for the garbage collector to trace.
type cacheEntry struct {
	generation uint64
	set        uint64
	distinctID string
	answers    []answer
}

const cacheShards = 16

// NewCache returns a cache holding at most size subjects' results. A size of zero
// or less disables caching.
func NewCache(size int) *Cache {
	c := &Cache{seed: maphash.MakeSeed()}
	c.minCost.Store(DefaultMinCost)
	if size <= 0 {
		return c
	}
	n := cacheShards
	for n > size {
		n /= 2
	}
	c.mask = uint64(n - 1)
	c.shards = make([]cacheShard, n)
	per := size / n
	for i := range c.shards {
		capacity := per
		if i < size%n {
			capacity++
		}
		l, err := lru.New[uint64, cacheEntry](capacity)
		if err != nil {
			panic(err) // capacity is positive by construction
		}
		c.shards[i].lru = l
	}
	return c
}

// Evaluate sets r to the results of set for s: from the cache when it holds
// them, otherwise evaluated (and cached when the set is worth caching). The
// answers may be shared with the cache: read them, never modify them.
func (c *Cache) Evaluate(set *FlagSet, s *Subject, r *Results) {
	r.set = set
	if c == nil || len(c.shards) == 0 || int64(set.cost) < c.minCost.Load() {
		r.answers = set.evaluate(s, r.buffer(len(set.flags)))
		r.own = r.answers
		return
	}
	gen := set.defs.generation
	key := mix(mix(c.fingerprint(s), gen), set.id)
	shard := &c.shards[key&c.mask]
	if entry, ok := shard.lru.Get(key); ok && entry.generation == gen && entry.set == set.id && entry.distinctID == s.DistinctID {
		shard.hits.Add(1)
		if len(set.clock) == 0 {
			r.answers = entry.answers
			return
		}
		// Relative dates move with the clock: recompute those flags.
		fresh := append(r.buffer(len(entry.answers)), entry.answers...)
		e := evaluation{defs: set.defs, subj: s}
		for _, i := range set.clock {
			fresh[i] = e.flag(set.flags[i], false)
		}
		e.release()
		r.answers, r.own = fresh, fresh
		return
	}
	shard.misses.Add(1)
	answers := set.evaluate(s, make([]answer, 0, len(set.flags)))
	// The id may be a slice of a larger request buffer; keep only its bytes.
	shard.lru.Add(key, cacheEntry{generation: gen, set: set.id, distinctID: strings.Clone(s.DistinctID), answers: answers})
	r.answers = answers
}

// SetMinCost sets the estimated evaluation cost (ns, see FlagSet.Cost) from
// which a flag set's answers are cached (DefaultMinCost unless set; 0 caches
// every set). Safe to call while the cache is in use.
func (c *Cache) SetMinCost(ns int) { c.minCost.Store(int64(ns)) }

// MinCost returns the caching threshold set by SetMinCost.
func (c *Cache) MinCost() int { return int(c.minCost.Load()) }

// Stats returns the cache's hit and miss counts and its current number of entries.
func (c *Cache) Stats() (hits, misses uint64, entries int) {
	if c == nil {
		return 0, 0, 0
	}
	for i := range c.shards {
		hits += c.shards[i].hits.Load()
		misses += c.shards[i].misses.Load()
		entries += c.shards[i].lru.Len()
	}
	return hits, misses, entries
}

// Purge empties the cache.
func (c *Cache) Purge() {
	if c == nil {
		return
	}
	for i := range c.shards {
		c.shards[i].lru.Purge()
	}
}

// fingerprint hashes everything evaluation reads from the subject except the
// clock. The subject is serialised into a stack buffer (a heap one only for an
// unusually large subject) and hashed in one call, several times faster than
// hashing each short string on its own. Every string is length-prefixed and
// values carry their kind, so different subjects cannot serialise alike.
func (c *Cache) fingerprint(s *Subject) uint64 {
	var space [384]byte
	b := appendString(space[:0], s.DistinctID)
	b = appendString(b, s.DeviceID)
	b = appendProperties(b, s.Person)
	b = binary.AppendUvarint(b, uint64(len(s.Groups)))
	for i := range s.Groups {
		g := &s.Groups[i]
		b = appendString(b, g.Type)
		b = appendString(b, g.Key)
		b = appendProperties(b, g.Properties)
	}
	return maphash.Bytes(c.seed, b)
}

func appendString(b []byte, s string) []byte {
	return append(binary.AppendUvarint(b, uint64(len(s))), s...)
}

func appendProperties(b []byte, props Properties) []byte {
	b = binary.AppendUvarint(b, uint64(len(props)))
	for i := range props {
		p := &props[i]
		b = appendString(b, p.Key)
		b = append(b, byte(p.Value.kind))
		b = appendString(b, p.Value.text)
	}
	return b
}

// mix folds v into h (a multiply-xorshift finaliser; order-sensitive).
func mix(h, v uint64) uint64 {
	h ^= v + 0x9e3779b97f4a7c15 + (h << 6) + (h >> 2)
	h *= 0xff51afd7ed558ccd
	return h ^ (h >> 33)
}

// Selection is a list of flag keys whose FlagSet follows the definitions in force:
// bound once per definitions generation, then reused lock-free.
type Selection struct {
	keys []string
	cur  atomic.Pointer[FlagSet]
}

// NewSelection selects keys; nil selects every flag.
func NewSelection(keys []string) *Selection {
	return &Selection{keys: keys}
}

// For returns the selection bound to d.
func (s *Selection) For(d *Definitions) *FlagSet {
	if fs := s.cur.Load(); fs != nil && fs.defs == d {
		return fs
	}
	fs := d.FlagSet(s.keys)
	s.cur.Store(fs)
	return fs
}

package eval

import (
	"sync"
	"time"
)

func newScratchPool() *sync.Pool {
	return &sync.Pool{New: func() any { return new(evalScratch) }}
}

// outcome is the three-and-a-half-valued result of matching.
type outcome uint8

const (
	outFalse outcome = iota
	outTrue
	// outInconclusive: this filter or condition cannot be decided; the flag may
	// still be decided by a later condition.
	outInconclusive
	// outRequiresServer: a missing or malformed cohort; the whole flag is
	// inconclusive at once, whatever later conditions say (PostHog's
	// RequiresServerEvaluation).
	outRequiresServer
)

// Evaluate returns the answer for one flag.
func (d *Definitions) Evaluate(key string, s *Subject) Result {
	f, ok := d.byKey[key]
	if !ok {
		return Result{Key: key, Reason: ReasonUnknownFlag, Condition: -1}
	}
	e := evaluation{defs: d, subj: s}
	a := e.flag(f, false)
	e.release()
	return f.result(a)
}

// EvaluateFlag returns the answer for a flag of these definitions.
func (d *Definitions) EvaluateFlag(f *Flag, s *Subject) Result {
	e := evaluation{defs: d, subj: s}
	a := e.flag(f, false)
	e.release()
	return f.result(a)
}

// EvaluateAll appends the answers for every flag, in definition order, to dst.
func (d *Definitions) EvaluateAll(s *Subject, dst []Result) []Result {
	e := evaluation{defs: d, subj: s}
	for _, f := range d.flags {
		dst = append(dst, f.result(e.flag(f, false)))
	}
	e.release()
	return dst
}

// answer is a flag's result packed into six bytes: what the result cache stores
// per flag, so a cached subject costs a few hundred bytes even with many flags.
type answer struct {
	variant int16 // index into the flag's variants, -1 for none
	cond    int16 // matching condition, -1 for none
	enabled bool
	reason  Reason
}

// maxPacked bounds variant and condition counts so indices fit an int16.
const maxPacked = 1<<15 - 1

func (a answer) inconclusive() bool { return a.reason.Inconclusive() }

// result expands a packed answer for this flag.
func (f *Flag) result(a answer) Result {
	r := Result{Key: f.Key, Enabled: a.enabled, Reason: a.reason, Condition: int(a.cond)}
	switch {
	case a.reason.Inconclusive():
	case a.variant >= 0:
		r.Variant = f.variants[a.variant].key
		r.Payload = f.variants[a.variant].payload
	case a.enabled:
		r.Payload = f.payloadTrue
	default:
		r.Payload = f.payloadFalse
	}
	return r
}

// evaluation holds the state of one evaluation request: the subject, the clock
// (read once, lazily) and the memo of flag dependencies. It lives on the caller's
// stack.
type evaluation struct {
	defs   *Definitions
	subj   *Subject
	nowT   time.Time
	nowSet bool
	// scopes numbers property sources, so cohort results can be memoised per
	// source: a cohort used twice (or referring twice to another) is
	// evaluated once, which keeps nested cohorts linear instead of exponential.
	scopes uint32
	// scratch holds the dependency and cohort memos. Most flags need neither,
	// so it is taken from the definitions' pool only on first use: a simple
	// flag's evaluation zeroes a few words, not the memo tables.
	scratch *evalScratch
}

type evalScratch struct {
	memo    memoTable
	cohorts cohortMemo
}

func (e *evaluation) memos() *evalScratch {
	if e.scratch == nil {
		e.scratch = e.defs.scratch.Get().(*evalScratch)
	}
	return e.scratch
}

// release returns the scratch memos, emptied, to the pool.
func (e *evaluation) release() {
	if sc := e.scratch; sc != nil {
		clear(sc.memo.inline[:sc.memo.n])
		sc.memo.n = 0
		sc.memo.more = nil
		sc.cohorts.n = 0
		sc.cohorts.more = sc.cohorts.more[:0]
		e.defs.scratch.Put(sc)
		e.scratch = nil
	}
}

func (e *evaluation) newScope() uint32 {
	e.scopes++
	return e.scopes
}

func (e *evaluation) now() time.Time {
	if !e.nowSet {
		if e.subj.Now.IsZero() {
			e.nowT = time.Now().UTC()
		} else {
			e.nowT = e.subj.Now.UTC()
		}
		e.nowSet = true
	}
	return e.nowT
}

// propSource is the property map a condition is matched against: the person's
// properties (plus distinct_id) or a group's (plus $group_key).
type propSource struct {
	scope    uint32
	props    Properties
	isGroup  bool
	fallback string // distinct id or group key
	bucket   string // hashing value for rollout and variant
	// implied holds the fallback as a Value once a filter asks for it.
	implied Value
}

func newPropSource(props Properties, isGroup bool, fallback, bucket string) propSource {
	return propSource{props: props, isGroup: isGroup, fallback: fallback, bucket: bucket}
}

// lookup returns the value for the filter's key, nil when the subject lacks it.
func (src *propSource) lookup(f *filter) *Value {
	for i := range src.props {
		if src.props[i].Key == f.key {
			return &src.props[i].Value
		}
	}
	if (f.isDistinctID && !src.isGroup) || (f.isGroupKey && src.isGroup) {
		src.implied = String(src.fallback)
		return &src.implied
	}
	return nil
}

func conclusive(enabled bool, variant int, reason Reason, cond int) answer {
	return answer{enabled: enabled, variant: int16(variant), reason: reason, cond: int16(cond)}
}

func inconclusive(reason Reason) answer {
	return answer{variant: -1, cond: -1, reason: reason}
}

// flag evaluates one flag (PostHog's _compute_flag_locally). asDependency is set
// when another flag depends on this one: dependencies are evaluated through their
// conditions even when they ask for experience continuity, as posthog-python does.
func (e *evaluation) flag(f *Flag, asDependency bool) answer {
	if o := f.override; o != nil {
		if o.Killed {
			return conclusive(false, -1, ReasonKilled, -1)
		}
		if o.Variant != "" {
			switch i := f.variantIndex(o.Variant); {
			case i >= 0:
				return conclusive(true, i, ReasonOverride, -1)
			case len(f.variants) == 0 && o.Variant == "true":
				return conclusive(true, -1, ReasonOverride, -1)
			case len(f.variants) == 0 && o.Variant == "false":
				return conclusive(false, -1, ReasonOverride, -1)
			}
		}
	}
	if f.broken != "" {
		return inconclusive(ReasonInvalidDefinition)
	}
	if e.subj.DistinctID == "" {
		return inconclusive(ReasonMissingDistinctID)
	}
	if f.ExperienceContinuity && !asDependency {
		return inconclusive(ReasonExperienceContinuity)
	}
	if !f.Active {
		return conclusive(false, -1, ReasonDisabled, -1)
	}

	var person propSource
	if f.group != nil {
		if f.group.name == "" {
			return inconclusive(ReasonMissingGroupType)
		}
		g := e.subj.group(f.group.name)
		if g == nil {
			return conclusive(false, -1, ReasonNoGroup, -1)
		}
		person = newPropSource(g.Properties, true, g.Key, g.Key)
		person.scope = e.newScope()
	} else {
		person = newPropSource(e.subj.Person, false, e.subj.DistinctID, e.subj.DistinctID)
		person.scope = e.newScope()
		if f.bucketByDevice {
			if e.subj.DeviceID == "" {
				return inconclusive(ReasonMissingDeviceID)
			}
			person.bucket = e.subj.DeviceID
		}
	}

	rolloutCap := 1.0
	if o := f.override; o != nil && o.RolloutPercentage != nil {
		rolloutCap = *o.RolloutPercentage / 100
	}
	var pending Reason // first reason a condition was inconclusive
	// gated: some condition's properties matched but the user fell outside
	// its rollout; PostHog's server then answers out_of_rollout_bound rather
	// than no_condition_match, and the sample-ratio check of a rollout
	// counts such users as matched.
	gated := false
	for ci := range f.conditions {
		cond := &f.conditions[ci]
		src := &person
		var groupSrc propSource
		if cond.group != nil {
			// Mixed targeting: this condition aggregates by a group. Without
			// that group (or its type) the condition is skipped.
			if cond.group.name == "" {
				continue
			}
			g := e.subj.group(cond.group.name)
			if g == nil {
				continue
			}
			groupSrc = newPropSource(g.Properties, true, g.Key, g.Key)
			groupSrc.scope = e.newScope()
			src = &groupSrc
		}
		o, reason := e.conditionFilters(cond, src)
		switch o {
		case outRequiresServer:
			return inconclusive(reason)
		case outInconclusive:
			if pending == 0 {
				pending = reason
			}
			continue
		case outFalse:
			continue
		}
		// Properties matched: the rollout gate. PostHog's SDKs count a user out
		// when hash > percentage/100 (so "<=" is in); 100 % needs no hash.
		limit := 1.0
		if cond.hasRollout {
			limit = cond.rollout
		}
		if rolloutCap < limit {
			limit = rolloutCap
		}
		if limit < 1 && hashPrefixed(f.hashPrefix, src.bucket, saltRollout) > limit {
			if f.earlyExit {
				return conclusive(false, -1, ReasonOutOfRollout, ci)
			}
			gated = true
			continue
		}
		v := cond.variant
		if v < 0 && len(f.variants) > 0 {
			v = f.selectVariant(src.bucket)
		}
		return conclusive(true, v, ReasonConditionMatch, ci)
	}
	if pending != 0 {
		return inconclusive(pending)
	}
	if gated {
		return conclusive(false, -1, ReasonOutOfRollout, -1)
	}
	return conclusive(false, -1, ReasonNoConditionMatch, -1)
}

// selectVariant walks the variant table (cumulative percentages in stored order,
// half-open intervals). A table that does not cover the hash gives no variant.
func (f *Flag) selectVariant(bucket string) int {
	h := hashPrefixed(f.hashPrefix, bucket, saltVariant)
	for i := range f.variants {
		if h >= f.variants[i].lo && h < f.variants[i].hi {
			if f.variants[i].key == "" {
				// PostHog's `variant or True`: an empty key is no variant.
				return -1
			}
			return i
		}
	}
	return -1
}

// conditionFilters ANDs a condition's filters in order: the first false filter
// decides (later ones are not looked at, so a missing property after it does not
// matter), the first inconclusive one makes the condition inconclusive.
func (e *evaluation) conditionFilters(cond *condition, src *propSource) (outcome, Reason) {
	for _, flt := range cond.filters {
		o, reason := e.filter(flt, src)
		if o != outTrue {
			return o, reason
		}
	}
	return outTrue, 0
}

func (e *evaluation) filter(flt *filter, src *propSource) (outcome, Reason) {
	switch flt.kind {
	case filterCohort:
		return e.cohortFilter(flt, src)
	case filterFlag:
		return e.dependency(flt)
	}
	return e.matchProperty(flt, src.lookup(flt))
}

func (e *evaluation) cohortFilter(flt *filter, src *propSource) (outcome, Reason) {
	n := flt.cohort
	switch {
	case n == nil:
		return outRequiresServer, ReasonStaticCohort
	case flt.cohortCycle, n.invalid:
		return outRequiresServer, ReasonMalformedCohort
	case n.requiresServer:
		return outRequiresServer, n.serverReason()
	case flt.cohortBadOp:
		return outInconclusive, ReasonUnknownOperator
	}
	memo := &e.memos().cohorts
	o, reason, ok := memo.get(n, src.scope)
	if !ok {
		o, reason = e.group(n, src)
		memo.put(n, src.scope, o, reason)
	}
	if flt.cohortNegated {
		o = negate(o)
	}
	return o, reason
}

// cohortMemo remembers cohort results within one evaluation, inline for the
// usual handful of cohorts.
type cohortMemo struct {
	inline [4]cohortResult
	n      int
	more   []cohortResult
}

type cohortResult struct {
	node    *cohortNode
	scope   uint32
	outcome outcome
	reason  Reason
}

func (m *cohortMemo) get(n *cohortNode, scope uint32) (outcome, Reason, bool) {
	for i := 0; i < m.n; i++ {
		if r := &m.inline[i]; r.node == n && r.scope == scope {
			return r.outcome, r.reason, true
		}
	}
	for i := range m.more {
		if r := &m.more[i]; r.node == n && r.scope == scope {
			return r.outcome, r.reason, true
		}
	}
	return 0, 0, false
}

func (m *cohortMemo) put(n *cohortNode, scope uint32, o outcome, reason Reason) {
	r := cohortResult{node: n, scope: scope, outcome: o, reason: reason}
	if m.n < len(m.inline) {
		m.inline[m.n] = r
		m.n++
		return
	}
	m.more = append(m.more, r)
}

func negate(o outcome) outcome {
	switch o {
	case outTrue:
		return outFalse
	case outFalse:
		return outTrue
	}
	return o
}

// group evaluates a property group. A decisive entry (false in AND, true in OR)
// wins over inconclusive ones; otherwise any inconclusive entry makes the group
// inconclusive. Groups that could need the server were found at compile time.
func (e *evaluation) group(n *cohortNode, src *propSource) (outcome, Reason) {
	if n.matchAll {
		return outTrue, 0
	}
	var pending Reason
	for i := range n.entries {
		entry := &n.entries[i]
		var o outcome
		var reason Reason
		if entry.group != nil {
			o, reason = e.group(entry.group, src)
		} else {
			o, reason = e.filter(entry.filter, src)
			if entry.filter.negation {
				o = negate(o)
			}
		}
		switch o {
		case outRequiresServer:
			return o, reason
		case outInconclusive:
			if pending == 0 {
				pending = reason
			}
		case outTrue:
			if !n.and {
				return outTrue, 0
			}
		case outFalse:
			if n.and {
				return outFalse, 0
			}
		}
	}
	if pending != 0 {
		return outInconclusive, pending
	}
	return boolOutcome(n.and), 0
}

// dependency evaluates a "type": "flag" filter: every flag of the dependency
// chain in order, then compares the target flag's value.
func (e *evaluation) dependency(flt *filter) (outcome, Reason) {
	switch {
	case flt.depMalformed:
		return outFalse, 0
	case flt.depChainMissing:
		return outInconclusive, ReasonMissingDependency
	case len(flt.depChain) == 0, flt.depCycle:
		return outInconclusive, ReasonDependencyCycle
	}
	var target answer
	found := false
	for _, dep := range flt.depChain {
		if dep < 0 {
			return outInconclusive, ReasonMissingDependency
		}
		r := e.dependencyValue(e.defs.flags[dep])
		if r.inconclusive() {
			return dependencyOutcome(r)
		}
		if dep == flt.depTarget {
			target, found = r, true
		}
	}
	if !found {
		if flt.depTarget < 0 {
			return outInconclusive, ReasonMissingDependency
		}
		target = e.dependencyValue(e.defs.flags[flt.depTarget])
		if target.inconclusive() {
			return dependencyOutcome(target)
		}
	}
	want := flt.value
	if target.variant >= 0 {
		switch want.kind {
		case KindBool:
			return boolOutcome(want.b), 0
		case KindString:
			depFlag := e.defs.flags[flt.depTarget]
			return boolOutcome(want.text == depFlag.variants[target.variant].key), 0
		}
		return outFalse, 0
	}
	return boolOutcome(want.kind == KindBool && want.b == target.enabled), 0
}

// dependencyOutcome is what an inconclusive dependency makes of the filter
// naming it: inconclusive, or, when the dependency needs PostHog's server (a
// static or malformed cohort), the whole flag needs it too. Both SDKs let
// RequiresServerEvaluation escape a dependency's evaluation, so a later
// condition that would match does not rescue the flag.
func dependencyOutcome(a answer) (outcome, Reason) {
	if a.reason == ReasonStaticCohort || a.reason == ReasonMalformedCohort {
		return outRequiresServer, a.reason
	}
	return outInconclusive, a.reason
}

func (e *evaluation) dependencyValue(f *Flag) answer {
	memo := &e.memos().memo
	if m := memo.get(f); m != nil {
		if m.inProgress {
			return inconclusive(ReasonDependencyCycle)
		}
		return m.result
	}
	memo.put(f, memoEntry{flag: f, inProgress: true})
	r := e.flag(f, true)
	memo.put(f, memoEntry{flag: f, result: r})
	return r
}

// memoTable memoises dependency results for one evaluation. Dependency chains are
// short, so a small inline array avoids allocating; a map takes over beyond it.
type memoTable struct {
	inline [6]memoEntry
	n      int
	more   map[*Flag]*memoEntry
}

type memoEntry struct {
	flag       *Flag
	inProgress bool
	result     answer
}

func (m *memoTable) get(f *Flag) *memoEntry {
	for i := 0; i < m.n; i++ {
		if m.inline[i].flag == f {
			return &m.inline[i]
		}
	}
	if m.more != nil {
		return m.more[f]
	}
	return nil
}

func (m *memoTable) put(f *Flag, entry memoEntry) {
	if existing := m.get(f); existing != nil {
		*existing = entry
		return
	}
	if m.n < len(m.inline) {
		m.inline[m.n] = entry
		m.n++
		return
	}
	if m.more == nil {
		m.more = map[*Flag]*memoEntry{}
	}
	stored := entry
	m.more[f] = &stored
}

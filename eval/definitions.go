package eval

import (
	"encoding/json"
	"fmt"
	"sync"
)

// Definitions is a compiled, immutable set of flag definitions: the body of
// PostHog's /flags/definitions endpoint after regexes, dates, semver ranges,
// variant tables, cohorts and dependency chains have been prepared once. It is safe
// for concurrent use; a new set replaces an old one as a whole (see Store).
type Definitions struct {
	flags      []*Flag
	byKey      map[string]*Flag
	groupTypes map[string]string // index (as in the JSON, e.g. "0") -> group type name
	problems   []Problem
	warnings   []Problem
	// generation identifies this set inside a Store; the result cache keys on it
	// so a swap invalidates every cached answer without a flush.
	generation uint64
	// MinimalFlagCalledEvents is the server's top-level gate for trimmed
	// $feature_flag_called events.
	MinimalFlagCalledEvents bool
	// scratch recycles evaluation memos; shared by copies of the set.
	scratch *sync.Pool
}

// Flag is one compiled flag definition.
type Flag struct {
	// ID is PostHog's numeric flag id.
	ID int64
	// Key is the case-sensitive flag key.
	Key string
	// Name is the flag's description in PostHog.
	Name string
	// Version is PostHog's flag version, when the server sends it.
	Version int64
	// Active is false for a disabled flag, and for a flag whose "active"
	// is missing or null; such a flag evaluates to false.
	Active bool
	// ExperienceContinuity flags need server-side state and never evaluate locally.
	ExperienceContinuity bool
	// HasExperiment reports whether PostHog said the flag backs an experiment
	// (nil when the server did not say).
	HasExperiment *bool

	index          int
	hashPrefix     string // key + "." so the hash input is built without a join
	bucketByDevice bool
	group          *groupRef // non-nil for group-aggregated flags
	conditions     []condition
	variants       []variant
	payloadTrue    *Payload
	payloadFalse   *Payload
	earlyExit      bool
	usesClock      bool   // some filter compares against the wall clock
	broken         string // non-empty: malformed definition, evaluates inconclusive
	override       *Override
	hasDeps        bool
	// cost is a rough estimate of evaluating the flag, in nanoseconds, used
	// to decide whether caching its answers pays (see FlagSet).
	cost int
}

// Payload is the payload attached to one flag value.
type Payload struct {
	// Raw is the payload exactly as stored in the definitions: usually a JSON
	// string whose contents are JSON ("{\"a\":1}"), sometimes a JSON value.
	Raw json.RawMessage
	// JSON is the payload as a JSON document: the contents of Raw when Raw is a
	// string holding valid JSON, otherwise Raw itself. This is what PostHog's SDKs
	// hand to applications.
	JSON json.RawMessage
}

type groupRef struct {
	index string // group type index as text
	name  string // group type name; "" when group_type_mapping lacks the index
}

type variant struct {
	key     string
	lo, hi  float64
	payload *Payload
}

type condition struct {
	filters    []*filter
	hasRollout bool
	rollout    float64 // fraction: rollout_percentage / 100
	variant    int     // index into the flag's variants, -1 when none or unknown
	group      *groupRef
}

// Problem is something wrong, or not locally evaluable, in a definitions document,
// located by JSON path and flag key.
type Problem struct {
	// Path is the JSON path of the offending value, e.g. flags[2].filters.groups[0].
	Path string `json:"path"`
	// Flag is the key of the flag concerned, if known.
	Flag string `json:"flag,omitempty"`
	// Message says what is wrong.
	Message string `json:"message"`
}

func (p Problem) String() string {
	if p.Flag != "" {
		return fmt.Sprintf("%s (flag %q): %s", p.Path, p.Flag, p.Message)
	}
	return fmt.Sprintf("%s: %s", p.Path, p.Message)
}

// Flags returns the flags in document order. The slice must not be modified.
func (d *Definitions) Flags() []*Flag { return d.flags }

// Flag returns the flag with the given key.
func (d *Definitions) Flag(key string) (*Flag, bool) {
	f, ok := d.byKey[key]
	return f, ok
}

// Len returns the number of flags.
func (d *Definitions) Len() int { return len(d.flags) }

// Generation identifies this set of definitions within its Store (0 before it was
// stored).
func (d *Definitions) Generation() uint64 { return d.generation }

// Problems lists malformed parts of the document. Flags with problems evaluate as
// inconclusive; the rest of the document is usable.
func (d *Definitions) Problems() []Problem { return d.problems }

// Warnings lists what is well-formed but cannot be decided locally, or not as the
// author may expect: experience continuity, static or malformed cohorts,
// is_not_set, unknown operators, regexes python's re rejects or only the
// backtracking engine can run (see Flag.BacktrackingRegexes), unparseable
// dates and versions, non-boolean switches.
func (d *Definitions) Warnings() []Problem { return d.warnings }

// GroupTypes returns the group type names by index, as sent by PostHog.
func (d *Definitions) GroupTypes() map[string]string { return d.groupTypes }

// Index is the flag's position in its Definitions.
func (f *Flag) Index() int { return f.index }

// Variants returns the keys of the flag's multivariate variants, in order.
func (f *Flag) Variants() []string {
	keys := make([]string, len(f.variants))
	for i, v := range f.variants {
		keys[i] = v.key
	}
	return keys
}

// HasVariant reports whether key is one of the flag's variants.
func (f *Flag) HasVariant(key string) bool { return f.variantIndex(key) >= 0 }

// IsGroupFlag reports whether the flag aggregates by a group type, and which.
func (f *Flag) IsGroupFlag() (groupType string, ok bool) {
	if f.group == nil {
		return "", false
	}
	return f.group.name, true
}

// Broken returns why the flag's definition is malformed, or "".
func (f *Flag) Broken() string { return f.broken }

// ConditionCount returns the number of release conditions.
func (f *Flag) ConditionCount() int { return len(f.conditions) }

// Override returns the runtime override applied to this flag, if any.
func (f *Flag) Override() *Override { return f.override }

func (f *Flag) variantIndex(key string) int {
	for i := range f.variants {
		if f.variants[i].key == key {
			return i
		}
	}
	return -1
}

// forEachFilter calls fn for every filter evaluating f can reach: its
// conditions' filters and, recursively, the filters of the cohorts they use.
func (f *Flag) forEachFilter(fn func(*filter)) {
	seen := map[*cohortNode]bool{}
	var walkFilter func(*filter)
	var walkNode func(*cohortNode)
	walkFilter = func(flt *filter) {
		fn(flt)
		if flt.kind == filterCohort && flt.cohort != nil {
			walkNode(flt.cohort)
		}
	}
	walkNode = func(n *cohortNode) {
		if seen[n] {
			return
		}
		seen[n] = true
		for _, e := range n.entries {
			if e.group != nil {
				walkNode(e.group)
			} else {
				walkFilter(e.filter)
			}
		}
	}
	for _, cond := range f.conditions {
		for _, flt := range cond.filters {
			walkFilter(flt)
		}
	}
}

// CheckDocument checks what makes a whole definitions document unusable, in
// one pass over its bytes and one decoding of its top level: over a limit (a
// *LimitError: MaxDocumentSize, MaxDepth, MaxFlags), not JSON, not an object,
// or without a list of flags. A missing, null or non-list "flags" is an
// answer that lost its flags on the way, not a project without any, which is
// {"flags": []}: taking it for one would turn every flag off. Parse makes the
// same checks; this is for callers that must refuse a document before
// handing it on.
func CheckDocument(data []byte) error {
	_, _, err := readDocument(data)
	return err
}

func readDocument(data []byte) (rawObject, []json.RawMessage, error) {
	if err := checkLimits(data); err != nil {
		return nil, nil, err
	}
	var top rawObject
	if err := json.Unmarshal(data, &top); err != nil {
		return nil, nil, fmt.Errorf("flag definitions: not a JSON object: %w", err)
	}
	if top == nil {
		return nil, nil, fmt.Errorf("flag definitions: document is null")
	}
	raw, ok := top["flags"]
	if !ok {
		return nil, nil, fmt.Errorf(`flag definitions: no "flags" list (a project without flags is {"flags": []})`)
	}
	var rawFlags []json.RawMessage
	if isNull(raw) || json.Unmarshal(raw, &rawFlags) != nil {
		return nil, nil, fmt.Errorf(`flag definitions: "flags" is %s, not a list (a project without flags is {"flags": []})`, flagsKind(raw))
	}
	if len(rawFlags) > MaxFlags {
		return nil, nil, &LimitError{Limit: "flags", Max: MaxFlags, Got: len(rawFlags), Offset: -1}
	}
	return top, rawFlags, nil
}

// rawObject is a JSON object whose members are decoded on demand, so a malformed
// member is reported by path instead of failing the whole document.
type rawObject map[string]json.RawMessage

func isNull(raw json.RawMessage) bool {
	return len(raw) == 0 || string(raw) == "null"
}

// Parse compiles a flag-definitions document. It fails when CheckDocument
// does; anything smaller is reported in Problems and the rest stays usable.
func Parse(data []byte) (*Definitions, error) {
	top, rawFlags, err := readDocument(data)
	if err != nil {
		return nil, err
	}
	c := &compiler{
		defs: &Definitions{
			byKey:      make(map[string]*Flag, len(rawFlags)),
			groupTypes: map[string]string{},
			scratch:    newScratchPool(),
		},
		cohortRaw: map[string]json.RawMessage{},
		cohorts:   map[string]*cohortNode{},
	}
	c.parseGroupTypes(top["group_type_mapping"])
	c.parseCohortTable(top["cohorts"])
	if raw, ok := top["minimal_flag_called_events"]; ok && !isNull(raw) {
		var b bool
		if json.Unmarshal(raw, &b) == nil {
			c.defs.MinimalFlagCalledEvents = b
		}
	}
	for i, raw := range rawFlags {
		c.parseFlag(i, raw)
	}
	c.resolveDependencies()
	c.analyseDependencies()
	for _, f := range c.defs.flags {
		f.cost = f.estimateCost()
	}
	return c.defs, nil
}

// TreatmentShare is the probability, over PostHog's rollout and variant
// hashes, that a subject whose properties match one of the flag's conditions
// is served a value other than false and a variant called "control" (the side
// a rollout moves users to), as the flag is defined here, overrides included.
//
// ok is false when no single probability holds: when it depends on which
// conditions a subject matches (their rollout gates, after any rollout
// override, differ, or they fix different variants), when the flag is not
// decided by the hash at all (inactive, killed, forced to a variant,
// malformed, experience continuity), or when it buckets by something other
// than the distinct id (group flags, device bucketing, mixed targeting).
func (f *Flag) TreatmentShare() (share float64, ok bool) {
	if o := f.override; o != nil && (o.Killed || o.Variant != "") {
		return 0, false
	}
	if !f.Active || f.broken != "" || f.ExperienceContinuity || f.group != nil || f.bucketByDevice || len(f.conditions) == 0 {
		return 0, false
	}
	cap := 1.0
	if o := f.override; o != nil && o.RolloutPercentage != nil {
		cap = *o.RolloutPercentage / 100
	}
	gate, fixed := -1.0, -2
	for i := range f.conditions {
		c := &f.conditions[i]
		if c.group != nil {
			return 0, false
		}
		g := 1.0
		if c.hasRollout {
			g = c.rollout
		}
		g = min(g, cap)
		if i == 0 {
			gate, fixed = g, c.variant
			continue
		}
		if g != gate || c.variant != fixed {
			return 0, false
		}
	}
	treated := 1.0 // a boolean flag, or a variant table that leaves gaps (true)
	switch {
	case fixed >= 0:
		if f.variants[fixed].key == "control" {
			treated = 0
		}
	default:
		for _, v := range f.variants {
			if v.key == "control" {
				treated -= v.hi - v.lo
			}
		}
	}
	return gate * treated, true
}

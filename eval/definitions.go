package eval

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
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

// BacktrackingRegexes returns the patterns of the flag's regex and not_regex
// filters, its own and those of the cohorts it uses, that the backtracking
// engine evaluates because RE2 cannot (look-arounds, back-references,
// conditionals, atomic groups, possessive repeats, repetition counts over
// 1000). Each such match may take up to RegexMatchTimeout, after which the
// filter is inconclusive with ReasonRegexTimeout. Patterns are listed once, in
// document order; nil when there are none. Patterns RE2 runs are not listed,
// even though the few values on which RE2's meaning differs from python's (a
// value ending in a newline for "$", a non-ASCII value for \b) go to the
// backtracking engine.
func (f *Flag) BacktrackingRegexes() []string {
	var out []string
	f.forEachFilter(func(flt *filter) {
		if flt.kind != filterProperty || (flt.op != opRegex && flt.op != opNotRegex) || flt.re.state != regexBacktrack {
			return
		}
		pattern := flt.value.Text()
		for _, seen := range out {
			if seen == pattern {
				return
			}
		}
		out = append(out, pattern)
	})
	return out
}

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

// rawObject is a JSON object whose members are decoded on demand, so a malformed
// member is reported by path instead of failing the whole document.
type rawObject map[string]json.RawMessage

func isNull(raw json.RawMessage) bool {
	return len(raw) == 0 || string(raw) == "null"
}

// Parse compiles a flag-definitions document. It fails only when the document is
// not a JSON object or its "flags" member is not a list; anything smaller is
// reported in Problems and the rest stays usable.
func Parse(data []byte) (*Definitions, error) {
	var top rawObject
	if err := json.Unmarshal(data, &top); err != nil {
		return nil, fmt.Errorf("flag definitions: not a JSON object: %w", err)
	}
	if top == nil {
		return nil, fmt.Errorf("flag definitions: document is null")
	}
	var rawFlags []json.RawMessage
	if !isNull(top["flags"]) {
		if err := json.Unmarshal(top["flags"], &rawFlags); err != nil {
			return nil, fmt.Errorf("flag definitions: $.flags is not a list: %w", err)
		}
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
	c.markClockUse()
	c.markDependencyCycles()
	for _, f := range c.defs.flags {
		f.cost = f.estimateCost()
	}
	return c.defs, nil
}

type compiler struct {
	defs      *Definitions
	cohortRaw map[string]json.RawMessage
	cohorts   map[string]*cohortNode
	// depFilters are resolved once every flag is known.
	depFilters []*filter
}

func (c *compiler) problem(path, flag, format string, args ...any) {
	c.defs.problems = append(c.defs.problems, Problem{Path: path, Flag: flag, Message: fmt.Sprintf(format, args...)})
}

func (c *compiler) warn(path, flag, format string, args ...any) {
	c.defs.warnings = append(c.defs.warnings, Problem{Path: path, Flag: flag, Message: fmt.Sprintf(format, args...)})
}

func (c *compiler) parseGroupTypes(raw json.RawMessage) {
	if isNull(raw) {
		return
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		c.problem("$.group_type_mapping", "", "not an object: %v", err)
		return
	}
	for idx, v := range m {
		var name string
		if err := json.Unmarshal(v, &name); err != nil {
			c.problem("$.group_type_mapping."+idx, "", "group type name is not a string")
			continue
		}
		c.defs.groupTypes[idx] = name
	}
}

func (c *compiler) parseCohortTable(raw json.RawMessage) {
	if isNull(raw) {
		return
	}
	if err := json.Unmarshal(raw, &c.cohortRaw); err != nil {
		c.problem("$.cohorts", "", "not an object: %v", err)
		c.cohortRaw = map[string]json.RawMessage{}
	}
}

func (c *compiler) parseFlag(i int, raw json.RawMessage) {
	path := "$.flags[" + strconv.Itoa(i) + "]"
	var obj rawObject
	if err := json.Unmarshal(raw, &obj); err != nil || obj == nil {
		c.problem(path, "", "flag is not an object")
		return
	}
	var key string
	if err := json.Unmarshal(obj["key"], &key); err != nil || key == "" {
		c.problem(path+".key", "", "flag key is missing or not a string")
		return
	}
	// "deleted" is not read: the endpoint never sends deleted flags, and
	// PostHog's SDKs evaluate a flag marked deleted like any other.
	index := len(c.defs.flags)
	old, dup := c.defs.byKey[key]
	if dup {
		// PostHog's SDKs index flags by key, so a later definition replaces
		// an earlier one; it takes the earlier one's place in the order.
		c.problem(path+".key", key, "duplicate flag key; the last definition is used, as PostHog's SDKs do")
		index = old.index
	}
	f := &Flag{Key: key, index: index, hashPrefix: key + "."}
	fc := flagCompiler{c: c, f: f, path: path}
	fc.compile(obj)
	if dup {
		c.defs.flags[index] = f
	} else {
		c.defs.flags = append(c.defs.flags, f)
	}
	c.defs.byKey[key] = f
}

// flagCompiler compiles one flag; the first structural problem marks it broken.
type flagCompiler struct {
	c    *compiler
	f    *Flag
	path string
}

func (fc *flagCompiler) fail(path, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	fc.c.problem(path, fc.f.Key, "%s", msg)
	if fc.f.broken == "" {
		fc.f.broken = path + ": " + msg
	}
}

func (fc *flagCompiler) decode(raw json.RawMessage, path string, dst any, what string) bool {
	if isNull(raw) {
		return false
	}
	if err := json.Unmarshal(raw, dst); err != nil {
		fc.fail(path, "%s", what)
		return false
	}
	return true
}

// truthy reads a flag-level switch as posthog-python does: absent and null
// are false, booleans are themselves, and other JSON values follow python's
// truthiness (zero, "", [] and {} are false). A non-boolean is worth a warning
// but is not malformed: PostHog's SDKs read it the same way.
func (fc *flagCompiler) truthy(raw json.RawMessage, path string) bool {
	if isNull(raw) {
		return false
	}
	var b bool
	if json.Unmarshal(raw, &b) == nil {
		return b
	}
	v, err := ParseJSONValue(raw)
	if err != nil {
		fc.fail(path, "not valid JSON: %v", err)
		return false
	}
	t := v.pythonTruthy()
	fc.c.warn(path, fc.f.Key, "%s is not a boolean; read as %v, as PostHog's SDKs do", path[strings.LastIndexByte(path, '.')+1:], t)
	return t
}

func (fc *flagCompiler) compile(obj rawObject) {
	f, p := fc.f, fc.path
	fc.decode(obj["id"], p+".id", &f.ID, "id is not an integer")
	fc.decode(obj["name"], p+".name", &f.Name, "name is not a string")
	fc.decode(obj["version"], p+".version", &f.Version, "version is not an integer")
	// PostHog's SDKs test both with the language's truthiness (python's
	// `if not flag.get("active")`): a missing or null active is inactive.
	f.Active = fc.truthy(obj["active"], p+".active")
	f.ExperienceContinuity = fc.truthy(obj["ensure_experience_continuity"], p+".ensure_experience_continuity")
	if !isNull(obj["has_experiment"]) {
		var b bool
		if fc.decode(obj["has_experiment"], p+".has_experiment", &b, "has_experiment is not a boolean") {
			f.HasExperiment = &b
		}
	}
	if f.ExperienceContinuity {
		fc.c.warn(p+".ensure_experience_continuity", f.Key, "experience continuity needs PostHog's server; never evaluated locally")
	}
	var encrypted bool
	if !isNull(obj["has_encrypted_payloads"]) {
		fc.decode(obj["has_encrypted_payloads"], p+".has_encrypted_payloads", &encrypted, "has_encrypted_payloads is not a boolean")
	}
	var bucketing string
	fc.decode(obj["bucketing_identifier"], p+".bucketing_identifier", &bucketing, "bucketing_identifier is not a string")

	var filters rawObject
	if !isNull(obj["filters"]) {
		if err := json.Unmarshal(obj["filters"], &filters); err != nil {
			fc.fail(p+".filters", "filters is not an object")
			return
		}
	}
	fp := p + ".filters"
	if bucketing == "" {
		fc.decode(filters["bucketing_identifier"], fp+".bucketing_identifier", &bucketing, "bucketing_identifier is not a string")
	}
	f.bucketByDevice = bucketing == "device_id"
	fc.decode(filters["early_exit"], fp+".early_exit", &f.earlyExit, "early_exit is not a boolean")

	if !isNull(filters["aggregation_group_type_index"]) {
		var idx int
		if fc.decode(filters["aggregation_group_type_index"], fp+".aggregation_group_type_index", &idx,
			"aggregation_group_type_index is not an integer") {
			f.group = fc.groupRef(idx, fp+".aggregation_group_type_index")
		}
	}
	fc.compileVariants(filters["multivariate"], fp+".multivariate")
	if encrypted {
		fc.c.warn(fp+".payloads", f.Key, "payloads are encrypted; they are not exposed locally")
	} else {
		fc.compilePayloads(filters["payloads"], fp+".payloads")
	}
	fc.compileConditions(filters["groups"], fp+".groups")
}

func (fc *flagCompiler) groupRef(idx int, path string) *groupRef {
	g := &groupRef{index: strconv.Itoa(idx)}
	name, ok := fc.c.defs.groupTypes[g.index]
	if ok {
		g.name = name
	} else {
		fc.c.warn(path, fc.f.Key, "group type index %d is not in group_type_mapping; the flag cannot be evaluated locally", idx)
	}
	return g
}

func (fc *flagCompiler) compileVariants(raw json.RawMessage, path string) {
	if isNull(raw) {
		return
	}
	var mv rawObject
	if err := json.Unmarshal(raw, &mv); err != nil {
		fc.fail(path, "multivariate is not an object")
		return
	}
	var list []rawObject
	if !fc.decode(mv["variants"], path+".variants", &list, "variants is not a list of objects") {
		return
	}
	if len(list) > maxPacked {
		fc.fail(path+".variants", "more than %d variants", maxPacked)
		return
	}
	lo := 0.0
	for i, v := range list {
		vp := path + ".variants[" + strconv.Itoa(i) + "]"
		var key string
		if err := json.Unmarshal(v["key"], &key); err != nil {
			fc.fail(vp+".key", "variant key is missing or not a string")
			return
		}
		var pct float64
		if !isNull(v["rollout_percentage"]) {
			if err := json.Unmarshal(v["rollout_percentage"], &pct); err != nil {
				fc.fail(vp+".rollout_percentage", "variant rollout_percentage is not a number")
				return
			}
		}
		hi := lo + pct/100
		fc.f.variants = append(fc.f.variants, variant{key: key, lo: lo, hi: hi})
		lo = hi
	}
}

func (fc *flagCompiler) compilePayloads(raw json.RawMessage, path string) {
	if isNull(raw) {
		return
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		fc.c.problem(path, fc.f.Key, "payloads is not an object; payloads ignored")
		return
	}
	for k, v := range m {
		if isNull(v) {
			continue
		}
		pl := newPayload(v)
		switch {
		case k == "true":
			fc.f.payloadTrue = pl
		case k == "false":
			fc.f.payloadFalse = pl
		}
		if i := fc.f.variantIndex(k); i >= 0 {
			fc.f.variants[i].payload = pl
		}
	}
}

func newPayload(raw json.RawMessage) *Payload {
	stored := append(json.RawMessage(nil), raw...)
	pl := &Payload{Raw: stored, JSON: stored}
	var s string
	if json.Unmarshal(stored, &s) == nil && json.Valid([]byte(s)) {
		pl.JSON = json.RawMessage(strings.TrimSpace(s))
	}
	return pl
}

func (fc *flagCompiler) compileConditions(raw json.RawMessage, path string) {
	if isNull(raw) {
		return
	}
	var list []json.RawMessage
	if err := json.Unmarshal(raw, &list); err != nil {
		fc.fail(path, "groups is not a list")
		return
	}
	if len(list) > maxPacked {
		fc.fail(path, "more than %d conditions", maxPacked)
		return
	}
	for i, rc := range list {
		cp := path + "[" + strconv.Itoa(i) + "]"
		var obj rawObject
		if err := json.Unmarshal(rc, &obj); err != nil || obj == nil {
			fc.fail(cp, "condition is not an object")
			return
		}
		cond := condition{variant: -1}
		if !isNull(obj["rollout_percentage"]) {
			var pct float64
			if err := json.Unmarshal(obj["rollout_percentage"], &pct); err != nil {
				fc.fail(cp+".rollout_percentage", "rollout_percentage is not a number")
				return
			}
			cond.hasRollout = true
			cond.rollout = pct / 100
		}
		if !isNull(obj["variant"]) {
			var v string
			if err := json.Unmarshal(obj["variant"], &v); err != nil {
				fc.fail(cp+".variant", "variant is not a string")
				return
			}
			// An override naming no variant of the flag (or an empty one) is
			// ignored, as in PostHog.
			if v != "" {
				cond.variant = fc.f.variantIndex(v)
			}
		}
		if fc.f.group == nil && !isNull(obj["aggregation_group_type_index"]) {
			var idx int
			if err := json.Unmarshal(obj["aggregation_group_type_index"], &idx); err != nil {
				fc.fail(cp+".aggregation_group_type_index", "aggregation_group_type_index is not an integer")
				return
			}
			cond.group = &groupRef{index: strconv.Itoa(idx), name: fc.c.defs.groupTypes[strconv.Itoa(idx)]}
		}
		if !isNull(obj["properties"]) {
			var props []json.RawMessage
			if err := json.Unmarshal(obj["properties"], &props); err != nil {
				fc.fail(cp+".properties", "properties is not a list")
				return
			}
			for j, rp := range props {
				flt, ok := fc.compileFilter(rp, cp+".properties["+strconv.Itoa(j)+"]")
				if !ok {
					return
				}
				cond.filters = append(cond.filters, flt)
			}
		}
		fc.f.conditions = append(fc.f.conditions, cond)
	}
}

// compileFilter compiles one property filter of a flag condition or cohort.
func (fc *flagCompiler) compileFilter(raw json.RawMessage, path string) (*filter, bool) {
	var obj rawObject
	if err := json.Unmarshal(raw, &obj); err != nil || obj == nil {
		fc.fail(path, "property filter is not an object")
		return nil, false
	}
	return fc.c.compileFilterObject(obj, path, fc.f, fc.fail)
}

// compileFilterObject is shared by flag conditions and cohorts. fail reports a
// structural problem; flag is the flag being compiled (nil inside cohorts).
func (c *compiler) compileFilterObject(obj rawObject, path string, flag *Flag, fail func(path, format string, args ...any)) (*filter, bool) {
	flagKey := ""
	if flag != nil {
		flagKey = flag.Key
	}
	flt := &filter{path: path}
	if !isNull(obj["key"]) {
		if err := json.Unmarshal(obj["key"], &flt.key); err != nil {
			fail(path+".key", "property key is not a string")
			return nil, false
		}
	}
	var typ string
	if !isNull(obj["type"]) {
		if err := json.Unmarshal(obj["type"], &typ); err != nil {
			fail(path+".type", "property type is not a string")
			return nil, false
		}
	}
	opName := ""
	if !isNull(obj["operator"]) {
		if err := json.Unmarshal(obj["operator"], &opName); err != nil {
			fail(path+".operator", "operator is not a string")
			return nil, false
		}
	}
	if !isNull(obj["negation"]) {
		if err := json.Unmarshal(obj["negation"], &flt.negation); err != nil {
			fail(path+".negation", "negation is not a boolean")
			return nil, false
		}
	}
	if !isNull(obj["value"]) {
		v, err := ParseJSONValue(obj["value"])
		if err != nil {
			fail(path+".value", "value is not valid JSON: %v", err)
			return nil, false
		}
		flt.value = v
	}
	flt.hasValue = !isNull(obj["value"])

	switch typ {
	case "cohort":
		flt.kind = filterCohort
		switch opName {
		case "", "exact", "in":
		case "not_in":
			flt.cohortNegated = true
		default:
			flt.cohortBadOp = true
			c.warn(path+".operator", flagKey, "operator %q is not valid for a cohort filter; cannot be evaluated locally", opName)
		}
		flt.cohortID = flt.value.Text()
		if flt.value.Kind() == KindString {
			flt.cohortID = flt.value.text
		}
		flt.cohort = c.cohort(flt.cohortID, flagKey, path, 0)
		return flt, true
	case "flag":
		flt.kind = filterFlag
		c.compileDependency(flt, obj, opName, path, flagKey)
		return flt, true
	}
	flt.kind = filterProperty
	flt.isDistinctID = flt.key == "distinct_id"
	flt.isGroupKey = flt.key == "$group_key"
	if opName == "" {
		opName = "exact"
	}
	flt.op = operatorByName(opName)
	c.prepareOperator(flt, opName, flagKey)
	return flt, true
}

func (c *compiler) compileDependency(flt *filter, obj rawObject, opName, path, flagKey string) {
	// A malformed dependency does not match (PostHog's SDKs warn and answer false).
	if opName != "flag_evaluates_to" || flt.key == "" || !flt.hasValue {
		flt.depMalformed = true
		c.warn(path, flagKey, "malformed flag dependency (needs key, operator flag_evaluates_to and a value); it never matches")
		return
	}
	switch flt.value.Kind() {
	case KindBool, KindString:
	default:
		flt.depMalformed = true
		c.warn(path+".value", flagKey, "flag dependency value must be a boolean or a variant key; it never matches")
		return
	}
	if isNull(obj["dependency_chain"]) {
		flt.depChainMissing = true
		c.warn(path+".dependency_chain", flagKey, "flag dependency without dependency_chain; cannot be evaluated locally")
		return
	}
	if err := json.Unmarshal(obj["dependency_chain"], &flt.depChainKeys); err != nil {
		flt.depChainMissing = true
		c.warn(path+".dependency_chain", flagKey, "dependency_chain is not a list of flag keys; cannot be evaluated locally")
		return
	}
	if len(flt.depChainKeys) == 0 {
		c.warn(path+".dependency_chain", flagKey, "empty dependency_chain marks a circular dependency; cannot be evaluated locally")
	}
	c.depFilters = append(c.depFilters, flt)
}

// resolveDependencies binds dependency chains to flags now that all are known.
func (c *compiler) resolveDependencies() {
	for _, flt := range c.depFilters {
		flt.depChain = make([]int, len(flt.depChainKeys))
		for i, k := range flt.depChainKeys {
			flt.depChain[i] = -1
			if dep, ok := c.defs.byKey[k]; ok {
				flt.depChain[i] = dep.index
			} else {
				c.warn(flt.path+".dependency_chain", "", "flag %q in the dependency chain is not defined; cannot be evaluated locally", k)
			}
		}
		flt.depTarget = -1
		if target, ok := c.defs.byKey[flt.key]; ok {
			flt.depTarget = target.index
		}
	}
	for _, f := range c.defs.flags {
		for _, cond := range f.conditions {
			for _, flt := range cond.filters {
				if flt.kind == filterFlag || (flt.kind == filterCohort && flt.cohort != nil && flt.cohort.hasDeps) {
					f.hasDeps = true
				}
			}
		}
	}
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

// references lists the flags a dependency filter evaluates: its chain and its
// target.
func (flt *filter) references() []int {
	if flt.kind != filterFlag || flt.depMalformed || flt.depChainMissing {
		return nil
	}
	refs := append([]int(nil), flt.depChain...)
	if flt.depTarget >= 0 {
		refs = append(refs, flt.depTarget)
	}
	return refs
}

// markClockUse finds flags whose answer can change with the wall clock, so
// cached answers for them are recomputed: flags with a date filter anywhere
// (relative dates move, and a partial date such as "2024" is completed from
// today), directly, inside cohorts, or through the flags they depend on.
func (c *compiler) markClockUse() {
	refs := make([][]int, len(c.defs.flags))
	for i, f := range c.defs.flags {
		f.forEachFilter(func(flt *filter) {
			if flt.usesClock() {
				f.usesClock = true
			}
			refs[i] = append(refs[i], flt.references()...)
		})
	}
	for changed := true; changed; {
		changed = false
		for i, f := range c.defs.flags {
			if f.usesClock {
				continue
			}
			for _, dep := range refs[i] {
				if dep >= 0 && c.defs.flags[dep].usesClock {
					f.usesClock, changed = true, true
					break
				}
			}
		}
	}
}

// markDependencyCycles finds flags that depend on themselves through other flags
// (PostHog's server sends such dependencies with an empty chain; malformed
// documents can still carry one) and marks the dependency filters on the cycle,
// so the answer is inconclusive whatever order flags are evaluated in.
func (c *compiler) markDependencyCycles() {
	n := len(c.defs.flags)
	adj := make([][]int, n)
	for i, f := range c.defs.flags {
		f.forEachFilter(func(flt *filter) {
			for _, dep := range flt.references() {
				if dep >= 0 {
					adj[i] = append(adj[i], dep)
				}
			}
		})
	}
	comp := stronglyConnected(adj)
	size := map[int]int{}
	for _, cID := range comp {
		size[cID]++
	}
	for i, f := range c.defs.flags {
		f.forEachFilter(func(flt *filter) {
			for _, dep := range flt.references() {
				if dep >= 0 && comp[dep] == comp[i] && (size[comp[i]] > 1 || dep == i) {
					flt.depCycle = true
				}
			}
		})
	}
}

// stronglyConnected labels the strongly connected components of a graph
// (Tarjan's algorithm, iterative so a long chain cannot exhaust the stack).
func stronglyConnected(adj [][]int) []int {
	n := len(adj)
	index, low, comp := make([]int, n), make([]int, n), make([]int, n)
	onStack := make([]bool, n)
	for i := range index {
		index[i], comp[i] = -1, -1
	}
	var stack []int
	next, nextComp := 0, 0
	type frame struct{ v, edge int }
	for root := 0; root < n; root++ {
		if index[root] >= 0 {
			continue
		}
		work := []frame{{root, 0}}
		index[root], low[root] = next, next
		next++
		stack = append(stack, root)
		onStack[root] = true
		for len(work) > 0 {
			top := &work[len(work)-1]
			v := top.v
			if top.edge < len(adj[v]) {
				w := adj[v][top.edge]
				top.edge++
				if index[w] < 0 {
					index[w], low[w] = next, next
					next++
					stack = append(stack, w)
					onStack[w] = true
					work = append(work, frame{w, 0})
				} else if onStack[w] && index[w] < low[v] {
					low[v] = index[w]
				}
				continue
			}
			if low[v] == index[v] {
				for {
					w := stack[len(stack)-1]
					stack = stack[:len(stack)-1]
					onStack[w] = false
					comp[w] = nextComp
					if w == v {
						break
					}
				}
				nextComp++
			}
			work = work[:len(work)-1]
			if len(work) > 0 {
				if u := work[len(work)-1].v; low[v] < low[u] {
					low[u] = low[v]
				}
			}
		}
	}
	return comp
}

// prepareOperator precomputes everything an operator needs from the filter value.
func (c *compiler) prepareOperator(flt *filter, opName, flagKey string) {
	v := flt.value
	switch flt.op {
	case opUnknown:
		c.warn(flt.path+".operator", flagKey, "operator %q is not supported by local evaluation; cannot be evaluated locally", opName)
	case opIsNotSet:
		c.warn(flt.path+".operator", flagKey, "is_not_set cannot be decided from the properties a request carries; cannot be evaluated locally")
	case opExact, opIsNot:
		flt.boolLike = v.boolLike()
		flt.truthy = v.truthy()
		if v.Kind() == KindList {
			flt.lowerList = make([]string, len(v.list))
			for i := range v.list {
				flt.lowerList[i] = lowerString(exactText(&v.list[i]))
			}
		} else {
			flt.lower = lowerString(exactText(&v))
		}
	case opIContains, opNotIContains, opStartsWith, opNotStartsWith, opEndsWith, opNotEndsWith:
		flt.lower = asciiLower(v.Text())
	case opRegex, opNotRegex:
		var why string
		flt.re, why = compileRegex(v.Text())
		switch flt.re.state {
		case regexInvalid:
			c.warn(flt.path+".value", flagKey, "regex %q is not a valid python regular expression (%s); it never matches", v.Text(), why)
		case regexUnsupported:
			c.warn(flt.path+".value", flagKey, "regex %q cannot be evaluated locally (%s)", v.Text(), why)
		case regexBacktrack:
			c.warn(flt.path+".value", flagKey, "regex %q needs the backtracking engine (RE2 cannot run it); each match may take up to %v, beyond which the filter is inconclusive (%s)",
				v.Text(), RegexMatchTimeout, ReasonRegexTimeout)
		}
	case opGT, opGTE, opLT, opLTE:
		flt.num, flt.numOK = v.Number()
		flt.lower = v.Text()
	case opDateBefore, opDateAfter:
		text := v.Text()
		if v.Kind() == KindNull {
			text = "None"
		}
		if n, unit, ok := parseRelativeDate(text); ok {
			flt.relN, flt.relUnit = n, unit
		} else if t, usesNow, ok := parseDate(text, time.Now().UTC()); ok && !usesNow {
			flt.date = t
		} else if _, _, ok := parseDate(text, time.Date(2001, 1, 1, 0, 0, 0, 0, time.UTC)); ok && usesNow {
			// A bare year: completed from the evaluation's clock each time.
			flt.dateUsesNow = true
			flt.dateText = text
		} else {
			flt.dateInvalid = true
			c.warn(flt.path+".value", flagKey, "date %q cannot be parsed; the filter cannot be evaluated locally", text)
		}
	case opSemverEq, opSemverNeq, opSemverGT, opSemverGTE, opSemverLT, opSemverLTE:
		sv, ok := parseSemver(v.Text())
		if !ok {
			flt.semverInvalid = true
			c.warn(flt.path+".value", flagKey, "version %q cannot be parsed; the filter cannot be evaluated locally", v.Text())
		}
		flt.semLo = sv
	case opSemverTilde, opSemverCaret, opSemverWildcard:
		lo, hi, ok := semverRange(flt.op, v.Text())
		if !ok {
			flt.semverInvalid = true
			c.warn(flt.path+".value", flagKey, "version range %q cannot be parsed; the filter cannot be evaluated locally", v.Text())
		}
		flt.semLo, flt.semHi = lo, hi
	}
}

// cohort compiles (once) and returns the cohort with the given id, nil when the
// definitions do not include it (a static cohort, which only PostHog's server can
// evaluate).
func (c *compiler) cohort(id, flagKey, path string, depth int) *cohortNode {
	if n, ok := c.cohorts[id]; ok {
		return n
	}
	raw, ok := c.cohortRaw[id]
	if !ok {
		c.warn(path+".value", flagKey, "cohort %s is not in the definitions (static cohort); cannot be evaluated locally", id)
		return nil
	}
	// Register before compiling children so a cohort that refers to itself is
	// caught as a cycle instead of recursing forever.
	n := &cohortNode{id: id, compiling: true}
	c.cohorts[id] = n
	cp := "$.cohorts." + id
	c.compileGroup(n, raw, cp, depth)
	n.compiling = false
	if n.invalid {
		c.warn(cp, flagKey, "cohort %s is malformed; cannot be evaluated locally", id)
	}
	return n
}

// ConditionCount returns the number of release conditions.
func (f *Flag) ConditionCount() int { return len(f.conditions) }

// NeverLocal returns why the flag can never be decided locally, or "" when some
// input can decide it: experience continuity, a malformed definition, an unknown
// group type, a first condition that needs PostHog's server (a static cohort),
// or conditions that all start with a filter local evaluation cannot decide.
func (f *Flag) NeverLocal() string {
	switch {
	case f.broken != "":
		return "malformed definition: " + f.broken
	case f.ExperienceContinuity:
		return "experience continuity needs PostHog's server"
	case f.group != nil && f.group.name == "":
		return "its group type index " + f.group.index + " is not in group_type_mapping"
	case len(f.conditions) == 0:
		return ""
	}
	undecidable := 0
	for i, cond := range f.conditions {
		if len(cond.filters) == 0 {
			continue
		}
		server, why := cond.filters[0].alwaysUndecided()
		if server && i == 0 {
			return "its first condition " + why
		}
		if why != "" {
			undecidable++
		}
	}
	if undecidable == len(f.conditions) {
		_, why := f.conditions[0].filters[0].alwaysUndecided()
		return "every condition starts with a filter that " + why
	}
	return ""
}

// alwaysUndecided reports whether the filter is inconclusive whatever the input,
// and whether that sends the whole flag to the server.
func (flt *filter) alwaysUndecided() (server bool, why string) {
	switch flt.kind {
	case filterCohort:
		switch {
		case flt.cohort == nil:
			return true, "uses a static cohort (" + flt.cohortID + "), which only PostHog's server can evaluate"
		case flt.cohortCycle || flt.cohort.invalid || flt.cohort.requiresServer:
			return true, "uses a cohort that is malformed or refers to a static cohort"
		case flt.cohortBadOp:
			return false, "uses an operator cohorts do not support"
		}
	case filterFlag:
		switch {
		case flt.depMalformed:
			return false, ""
		case flt.depChainMissing:
			return false, "depends on a flag without a dependency chain"
		case len(flt.depChain) == 0:
			return false, "is part of a circular flag dependency"
		}
		for _, dep := range flt.depChain {
			if dep < 0 {
				return false, "depends on a flag that is not defined"
			}
		}
	default:
		switch {
		case flt.op == opUnknown:
			return false, "uses an operator local evaluation does not know"
		case flt.op == opIsNotSet:
			return false, "uses is_not_set"
		case flt.dateInvalid:
			return false, "compares against a date that cannot be parsed"
		case flt.semverInvalid:
			return false, "compares against a version that cannot be parsed"
		}
	}
	return false, ""
}

// estimateCost guesses what evaluating the flag takes, from what it does: a
// hash per rollout gate and variant table, and per filter its operator's
// typical cost (measured with this package's benchmarks). Cohort and dependency
// filters count what they reach.
func (f *Flag) estimateCost() int {
	hash := 90
	if hasFastSHA1 {
		hash = 45
	}
	cost := 20
	if len(f.variants) > 0 {
		cost += hash
	}
	for _, cond := range f.conditions {
		cost += 5
		if cond.hasRollout && cond.rollout < 1 {
			cost += hash
		}
	}
	f.forEachFilter(func(flt *filter) {
		switch flt.kind {
		case filterCohort:
			cost += 30
		case filterFlag:
			cost += 20 + 60*len(flt.depChain)
		default:
			switch flt.op {
			case opRegex, opNotRegex:
				cost += 120
				if flt.re.state == regexBacktrack {
					cost += backtrackingRegexCost
				}
			case opDateBefore, opDateAfter:
				cost += 70
			case opSemverEq, opSemverNeq, opSemverGT, opSemverGTE, opSemverLT, opSemverLTE,
				opSemverTilde, opSemverCaret, opSemverWildcard:
				cost += 35
			default:
				cost += 20
			}
		}
	})
	return cost
}

package eval

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// compiler turns a definitions document into Definitions: flags, cohorts and
// their filters compiled once, problems and warnings collected by JSON path.
type compiler struct {
	defs      *Definitions
	cohortRaw map[string]json.RawMessage
	cohorts   map[string]*cohortNode
	// depFilters are resolved once every flag is known.
	depFilters []depFilter
}

// depFilter is a dependency filter and the key of the flag it is in ("" in
// a cohort).
type depFilter struct {
	filter *filter
	flag   string
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
	return fc.c.compileFilterObject(obj, path, fc.f, fc.fail, 0)
}

// compileFilterObject is shared by flag conditions and cohorts. fail reports a
// structural problem; flag is the flag being compiled (nil inside cohorts);
// depth is the nesting of property groups and cohorts around the filter.
func (c *compiler) compileFilterObject(obj rawObject, path string, flag *Flag, fail func(path, format string, args ...any), depth int) (*filter, bool) {
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
		flt.cohort = c.cohort(flt.cohortID, flagKey, path, depth)
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

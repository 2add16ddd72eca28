package eval

import (
	"encoding/json"
	"strconv"
)

// cohortNode is a compiled property group: a cohort's definition or a group nested
// inside one.
type cohortNode struct {
	id        string // cohort id, for the top-level node of a cohort
	and       bool
	matchAll  bool // {} or an empty values list: always true
	invalid   bool // malformed: only PostHog's server can decide
	compiling bool // set while the cohort is being compiled, to catch cycles
	entries   []cohortEntry
	// requiresServer is true when this group, or anything it reaches, is missing
	// or malformed. PostHog's SDKs evaluate every entry of a cohort, so such a
	// group sends the whole flag to the server even when another entry already
	// decided the group; knowing it up front lets evaluation short-circuit.
	requiresServer bool
	missingInside  bool // requiresServer because a static (absent) cohort is reached
	hasDeps        bool
}

type cohortEntry struct {
	group  *cohortNode
	filter *filter
}

// maxCohortDepth bounds nested property groups, counting a cohort that
// refers to another as a level too, so that neither compiling nor evaluating
// a long chain of cohorts recurses without bound. A cohort is compiled once,
// at the depth where it is first reached.
const maxCohortDepth = 32

func (c *compiler) compileGroup(n *cohortNode, raw json.RawMessage, path string, depth int) {
	if depth > maxCohortDepth {
		n.invalid, n.requiresServer = true, true
		c.warn(path, "", "property groups and cohort references nest deeper than %d levels; only PostHog's server can evaluate this", maxCohortDepth)
		return
	}
	var obj rawObject
	if err := json.Unmarshal(raw, &obj); err != nil || obj == nil {
		n.invalid, n.requiresServer = true, true
		return
	}
	if len(obj) == 0 {
		n.matchAll = true
		return
	}
	var typ string
	if json.Unmarshal(obj["type"], &typ) != nil || (typ != "AND" && typ != "OR") {
		n.invalid, n.requiresServer = true, true
		return
	}
	n.and = typ == "AND"
	var values []json.RawMessage
	if isNull(obj["values"]) || json.Unmarshal(obj["values"], &values) != nil {
		n.invalid, n.requiresServer = true, true
		return
	}
	if len(values) == 0 {
		n.matchAll = true
		return
	}
	for i, rv := range values {
		ep := path + ".values[" + strconv.Itoa(i) + "]"
		var entry rawObject
		if err := json.Unmarshal(rv, &entry); err != nil || entry == nil {
			n.invalid, n.requiresServer = true, true
			return
		}
		if isPropertyGroup(entry) {
			child := &cohortNode{}
			c.compileGroup(child, rv, ep, depth+1)
			n.entries = append(n.entries, cohortEntry{group: child})
			n.absorb(child)
			continue
		}
		broken := false
		flt, ok := c.compileFilterObject(entry, ep, nil, func(string, string, ...any) { broken = true }, depth+1)
		if !ok || broken {
			n.invalid, n.requiresServer = true, true
			return
		}
		if flt.kind == filterCohort {
			switch {
			case flt.cohort == nil || flt.cohort.compiling:
				// Missing (static) cohort, or a cycle back to a cohort being compiled.
				n.requiresServer = true
				flt.cohortCycle = flt.cohort != nil
				n.missingInside = n.missingInside || flt.cohort == nil
			default:
				n.absorb(flt.cohort)
			}
		}
		if flt.kind == filterFlag {
			n.hasDeps = true
		}
		n.entries = append(n.entries, cohortEntry{filter: flt})
	}
}

func (n *cohortNode) absorb(child *cohortNode) {
	n.requiresServer = n.requiresServer || child.requiresServer || child.invalid
	n.missingInside = n.missingInside || child.missingInside
	n.hasDeps = n.hasDeps || child.hasDeps
}

// isPropertyGroup tells a nested group from a filter: it has values, a type of
// AND/OR, or is the empty object.
func isPropertyGroup(obj rawObject) bool {
	if len(obj) == 0 {
		return true
	}
	if _, ok := obj["values"]; ok {
		return true
	}
	var typ string
	if json.Unmarshal(obj["type"], &typ) == nil && (typ == "AND" || typ == "OR") {
		return true
	}
	return false
}

// serverReason says why a group needs PostHog's server.
func (n *cohortNode) serverReason() Reason {
	if n.missingInside {
		return ReasonStaticCohort
	}
	return ReasonMalformedCohort
}

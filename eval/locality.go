package eval

import "strconv"

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

// NeverLocal returns why the flag can never be decided locally, or "" when some
// input can decide it: experience continuity, a malformed definition, an unknown
// group type, a first condition that needs PostHog's server (a static cohort),
// or conditions that all start with a filter local evaluation cannot decide,
// such as a dependency on a flag that is not defined, one on a dependency
// cycle (with the cycle's path), or one on a flag that can never be decided
// itself. Overrides are not taken into account.
func (f *Flag) NeverLocal() string {
	if f.ExperienceContinuity && f.broken == "" {
		return "experience continuity needs PostHog's server"
	}
	return f.undecided()
}

// undecidedAsDependency is why the flag is inconclusive whenever another flag
// depends on it, or "": as NeverLocal, except that a disabled flag answers
// false and experience continuity does not apply to dependencies.
func (f *Flag) undecidedAsDependency() string {
	if !f.Active && f.broken == "" {
		return ""
	}
	return f.undecided()
}

func (f *Flag) undecided() string {
	switch {
	case f.broken != "":
		return "malformed definition: " + f.broken
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
			return false, "is part of a circular flag dependency (PostHog sent an empty dependency_chain for flag " + strconv.Quote(flt.key) + ")"
		case flt.depCycle:
			return false, "is part of a circular flag dependency: " + flt.depCyclePath
		case flt.depUndecided != "":
			return false, flt.depUndecided
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

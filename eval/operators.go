package eval

import (
	"time"
)

type filterKind uint8

const (
	filterProperty filterKind = iota
	filterCohort
	filterFlag
)

type operator uint8

const (
	opUnknown operator = iota
	opExact
	opIsNot
	opIsSet
	opIsNotSet
	opIContains
	opNotIContains
	opStartsWith
	opNotStartsWith
	opEndsWith
	opNotEndsWith
	opRegex
	opNotRegex
	opGT
	opGTE
	opLT
	opLTE
	opDateBefore
	opDateAfter
	opSemverEq
	opSemverNeq
	opSemverGT
	opSemverGTE
	opSemverLT
	opSemverLTE
	opSemverTilde
	opSemverCaret
	opSemverWildcard
)

var operatorNames = map[string]operator{
	"exact":           opExact,
	"is_not":          opIsNot,
	"is_set":          opIsSet,
	"is_not_set":      opIsNotSet,
	"icontains":       opIContains,
	"not_icontains":   opNotIContains,
	"starts_with":     opStartsWith,
	"not_starts_with": opNotStartsWith,
	"ends_with":       opEndsWith,
	"not_ends_with":   opNotEndsWith,
	"regex":           opRegex,
	"not_regex":       opNotRegex,
	"gt":              opGT,
	"gte":             opGTE,
	"lt":              opLT,
	"lte":             opLTE,
	"is_date_before":  opDateBefore,
	"is_date_after":   opDateAfter,
	"semver_eq":       opSemverEq,
	"semver_neq":      opSemverNeq,
	"semver_gt":       opSemverGT,
	"semver_gte":      opSemverGTE,
	"semver_lt":       opSemverLT,
	"semver_lte":      opSemverLTE,
	"semver_tilde":    opSemverTilde,
	"semver_caret":    opSemverCaret,
	"semver_wildcard": opSemverWildcard,
}

// operatorByName maps PostHog's operator names; anything else (in, not_in and
// flag_evaluates_to outside cohort and flag filters, is_date_exact, between, ...)
// is unknown to local evaluation and makes the filter inconclusive.
func operatorByName(name string) operator {
	return operatorNames[name]
}

// filter is one compiled property filter.
type filter struct {
	path     string
	kind     filterKind
	key      string
	op       operator
	negation bool
	value    Value
	hasValue bool

	isDistinctID bool // key "distinct_id": falls back to the subject's distinct id
	isGroupKey   bool // key "$group_key": falls back to the group's key

	// exact / is_not
	boolLike  bool
	truthy    bool
	lower     string   // lower-cased value (Unicode for exact, ASCII for contains & co)
	lowerList []string // lower-cased list elements for exact against a list

	re compiledRegex // regex, not_regex

	num   float64 // gt & co: the filter value as a number
	numOK bool

	// dates: either a relative offset or an absolute instant
	relN        int
	relUnit     byte
	date        time.Time
	dateUsesNow bool // absolute date with parts filled from "today" (e.g. a bare year)
	dateText    string
	dateInvalid bool

	semLo, semHi  semver
	semverInvalid bool

	// cohort filters
	cohortID      string
	cohort        *cohortNode
	cohortNegated bool
	cohortBadOp   bool
	cohortCycle   bool

	// flag dependencies
	depMalformed    bool
	depChainMissing bool
	depChainKeys    []string
	depChain        []int // flag indices; -1 for a flag the definitions lack
	depTarget       int   // index of the flag compared, -1 when undefined
	depCycle        bool  // the dependency leads back to the flag evaluating it
	depCyclePath    string
	// depUndecided says why the filter can never be decided: a flag it
	// evaluates is not defined or can never be decided itself.
	depUndecided string
}

// usesClock reports whether the filter's answer can depend on the wall clock:
// any date comparison can (relative dates, and person values such as "2024"
// completed from today's date).
func (f *filter) usesClock() bool {
	return f.kind == filterProperty && (f.op == opDateBefore || f.op == opDateAfter)
}

// exactText is the stringification the exact operator compares: Python's str()
// for null ("None", so is_not "none" against null is false, as in posthog-python),
// the flags service's spelling for everything else.
func exactText(v *Value) string {
	if v.kind == KindNull {
		return "None"
	}
	return v.text
}

// matchProperty evaluates a property filter against the value found for its key.
func (e *evaluation) matchProperty(f *filter, ov *Value) (outcome, Reason) {
	switch f.op {
	case opUnknown:
		return outInconclusive, ReasonUnknownOperator
	}
	if ov == nil {
		return outInconclusive, ReasonMissingProperty
	}
	if f.op == opIsNotSet {
		return outInconclusive, ReasonIsNotSet
	}
	if ov.kind == KindNull && f.op != opIsNot {
		return outFalse, 0
	}
	switch f.op {
	case opExact:
		return boolOutcome(exactMatch(f, ov)), 0
	case opIsNot:
		return boolOutcome(!exactMatch(f, ov)), 0
	case opIsSet:
		return outTrue, 0
	case opIContains:
		return boolOutcome(containsASCIIFold(ov.Text(), f.lower)), 0
	case opNotIContains:
		return boolOutcome(!containsASCIIFold(ov.Text(), f.lower)), 0
	case opStartsWith:
		return boolOutcome(hasPrefixASCIIFold(ov.Text(), f.lower)), 0
	case opNotStartsWith:
		return boolOutcome(!hasPrefixASCIIFold(ov.Text(), f.lower)), 0
	case opEndsWith:
		return boolOutcome(hasSuffixASCIIFold(ov.Text(), f.lower)), 0
	case opNotEndsWith:
		return boolOutcome(!hasSuffixASCIIFold(ov.Text(), f.lower)), 0
	case opRegex:
		if re := f.re.re2For(ov.Text()); re != nil {
			return boolOutcome(re.MatchString(ov.Text())), 0
		}
		return matchRegex(f, ov, false)
	case opNotRegex:
		if re := f.re.re2For(ov.Text()); re != nil {
			return boolOutcome(!re.MatchString(ov.Text())), 0
		}
		return matchRegex(f, ov, true)
	case opGT, opGTE, opLT, opLTE:
		return boolOutcome(compareOrdered(f, ov)), 0
	case opDateBefore, opDateAfter:
		return e.matchDate(f, ov)
	case opSemverEq, opSemverNeq, opSemverGT, opSemverGTE, opSemverLT, opSemverLTE,
		opSemverTilde, opSemverCaret, opSemverWildcard:
		return matchSemver(f, ov)
	}
	return outInconclusive, ReasonUnknownOperator
}

// matchRegex is regex (negated: not_regex) where RE2 does not answer: an
// invalid pattern is false for both operators, a match the backtracking
// engine cannot finish is inconclusive.
func matchRegex(f *filter, ov *Value, negated bool) (outcome, Reason) {
	if f.re.state == regexInvalid {
		return outFalse, 0
	}
	m, reason := f.re.match(ov.Text())
	if reason != 0 {
		return outInconclusive, reason
	}
	return boolOutcome(m != negated), 0
}

func boolOutcome(b bool) outcome {
	if b {
		return outTrue
	}
	return outFalse
}

// exactMatch is the flags service's exact comparison: truthiness when the filter
// value is boolean-like, otherwise full-Unicode lower-cased string equality with
// the value or any element of a list value.
func exactMatch(f *filter, ov *Value) bool {
	if f.boolLike {
		return ov.truthy() == f.truthy
	}
	text := exactText(ov)
	if f.lowerList != nil {
		for _, want := range f.lowerList {
			if equalLower(text, want) {
				return true
			}
		}
		return false
	}
	return equalLower(text, f.lower)
}

// compareOrdered implements gt, gte, lt and lte: numerically when both sides are
// finite numbers (strings that spell numbers included), otherwise by comparing the
// stringified values, so "100" lt 30 is false while "b" gt "a" is true.
func compareOrdered(f *filter, ov *Value) bool {
	if f.numOK {
		if n, ok := ov.Number(); ok {
			switch f.op {
			case opGT:
				return n > f.num
			case opGTE:
				return n >= f.num
			case opLT:
				return n < f.num
			default:
				return n <= f.num
			}
		}
	}
	a, b := ov.Text(), f.lower
	switch f.op {
	case opGT:
		return a > b
	case opGTE:
		return a >= b
	case opLT:
		return a < b
	default:
		return a <= b
	}
}

func (e *evaluation) matchDate(f *filter, ov *Value) (outcome, Reason) {
	if f.dateInvalid {
		return outInconclusive, ReasonInvalidValue
	}
	if ov.kind != KindString {
		return outInconclusive, ReasonInvalidValue
	}
	now := e.now()
	got, _, ok := parseDate(ov.text, now)
	if !ok {
		return outInconclusive, ReasonInvalidValue
	}
	threshold := f.date
	switch {
	case f.relUnit != 0:
		threshold, ok = subtractRelative(now, f.relN, f.relUnit)
	case f.dateUsesNow:
		// A bare year takes today's month and day, which can be 29 February.
		threshold, _, ok = parseDate(f.dateText, now)
	}
	if !ok {
		return outInconclusive, ReasonInvalidValue
	}
	if f.op == opDateBefore {
		return boolOutcome(got.Before(threshold)), 0
	}
	return boolOutcome(got.After(threshold)), 0
}

func matchSemver(f *filter, ov *Value) (outcome, Reason) {
	if f.semverInvalid {
		return outInconclusive, ReasonInvalidValue
	}
	got, ok := parseSemver(ov.Text())
	if !ok {
		return outInconclusive, ReasonInvalidValue
	}
	c := got.compare(f.semLo)
	switch f.op {
	case opSemverEq:
		return boolOutcome(c == 0), 0
	case opSemverNeq:
		return boolOutcome(c != 0), 0
	case opSemverGT:
		return boolOutcome(c > 0), 0
	case opSemverGTE:
		return boolOutcome(c >= 0), 0
	case opSemverLT:
		return boolOutcome(c < 0), 0
	case opSemverLTE:
		return boolOutcome(c <= 0), 0
	}
	// tilde, caret, wildcard: lo <= v < hi
	return boolOutcome(c >= 0 && got.compare(f.semHi) < 0), 0
}

package eval

import (
	"encoding/json"
	"strconv"
	"time"
)

// Subject is who a flag is evaluated for.
type Subject struct {
	// DistinctID is the person's distinct id (the default bucketing value).
	DistinctID string
	// DeviceID buckets flags whose bucketing identifier is "device_id".
	DeviceID string
	// Person holds the person properties the caller knows. The evaluator adds
	// "distinct_id" itself when absent.
	Person Properties
	// Groups are the groups the person acts in, with their properties. The
	// evaluator adds "$group_key" to each group's properties when absent.
	Groups []Group
	// Now is the wall clock for relative dates; zero means time.Now().
	Now time.Time
}

// Group is one group (company, project, ...) of a subject.
type Group struct {
	// Type is the group type name, as in group_type_mapping.
	Type string
	// Key identifies the group; group flags bucket by it.
	Key string
	// Properties are the group's properties.
	Properties Properties
}

// Property is one named property value.
type Property struct {
	Key   string
	Value Value
}

// Properties is a small list of properties. A list rather than a map: requests
// carry a handful of properties, a linear scan over them is faster than hashing,
// and building one per request does not allocate a map.
type Properties []Property

// Get returns the value of the property named key.
func (p Properties) Get(key string) (Value, bool) {
	for i := range p {
		if p[i].Key == key {
			return p[i].Value, true
		}
	}
	return Value{}, false
}

// PropertiesFromMap builds Properties from a decoded JSON object, sorted by key for
// a stable order.
func PropertiesFromMap(m map[string]Value) Properties {
	p := make(Properties, 0, len(m))
	for k, v := range m {
		p = append(p, Property{Key: k, Value: v})
	}
	sortProperties(p)
	return p
}

func (s *Subject) group(typ string) *Group {
	for i := range s.Groups {
		if s.Groups[i].Type == typ {
			return &s.Groups[i]
		}
	}
	return nil
}

// Reason says why a flag has its value. Reasons at or above
// ReasonUnknownFlag mean the flag could not be decided locally (PostHog's SDKs
// would ask the server); such results carry the value false.
type Reason uint8

// Reasons.
const (
	ReasonNone Reason = iota
	// ReasonConditionMatch: a release condition matched.
	ReasonConditionMatch
	// ReasonNoConditionMatch: no condition matched.
	ReasonNoConditionMatch
	// ReasonOutOfRollout: a condition's properties matched but the user is
	// outside its rollout, and no later condition let the user in.
	ReasonOutOfRollout
	// ReasonDisabled: the flag is not active.
	ReasonDisabled
	// ReasonNoGroup: a group flag, and the subject is not in a group of its type.
	ReasonNoGroup
	// ReasonKilled: a kill-switch override forces false.
	ReasonKilled
	// ReasonOverride: a variant override forces the value.
	ReasonOverride

	// ReasonUnknownFlag: no flag with that key is defined.
	ReasonUnknownFlag
	// ReasonExperienceContinuity: the flag needs PostHog's server-side state.
	ReasonExperienceContinuity
	// ReasonMissingProperty: a filter needs a property the subject lacks.
	ReasonMissingProperty
	// ReasonStaticCohort: a cohort is not in the definitions (static cohorts are
	// never sent).
	ReasonStaticCohort
	// ReasonMalformedCohort: a cohort definition is malformed or cyclic.
	ReasonMalformedCohort
	// ReasonUnknownOperator: an operator local evaluation does not know.
	ReasonUnknownOperator
	// ReasonIsNotSet: is_not_set cannot be decided from partial properties.
	ReasonIsNotSet
	// ReasonInvalidValue: a date or version that cannot be parsed, a value
	// of a type the operator cannot compare, or a regex posthog-python cannot
	// compile without raising something other than re.error.
	ReasonInvalidValue
	// ReasonMissingGroupType: the flag's group type index is not in
	// group_type_mapping.
	ReasonMissingGroupType
	// ReasonMissingDeviceID: a device-bucketed flag and no device id.
	ReasonMissingDeviceID
	// ReasonDependencyCycle: flag dependencies form a cycle.
	ReasonDependencyCycle
	// ReasonMissingDependency: a flag dependency names an undefined flag, or has
	// no dependency chain.
	ReasonMissingDependency
	// ReasonInvalidDefinition: the flag's definition is malformed.
	ReasonInvalidDefinition
	// ReasonMissingDistinctID: the subject has no distinct id. PostHog
	// evaluates nothing without one; bucketing every anonymous request on the
	// empty id would put them all in the same variant.
	ReasonMissingDistinctID
	// ReasonRegexTimeout: a regex filter's pattern needs the backtracking
	// engine and the match ran out of its time (RegexMatchTimeout), as
	// catastrophic backtracking does.
	ReasonRegexTimeout
	reasonCount
)

var reasonNames = [reasonCount]string{
	ReasonNone:                 "none",
	ReasonConditionMatch:       "condition_match",
	ReasonNoConditionMatch:     "no_condition_match",
	ReasonOutOfRollout:         "out_of_rollout_bound",
	ReasonDisabled:             "flag_disabled",
	ReasonNoGroup:              "no_group",
	ReasonKilled:               "killed",
	ReasonOverride:             "override",
	ReasonUnknownFlag:          "unknown_flag",
	ReasonExperienceContinuity: "experience_continuity",
	ReasonMissingProperty:      "missing_property",
	ReasonStaticCohort:         "static_cohort",
	ReasonMalformedCohort:      "malformed_cohort",
	ReasonUnknownOperator:      "unknown_operator",
	ReasonIsNotSet:             "is_not_set",
	ReasonInvalidValue:         "invalid_value",
	ReasonMissingGroupType:     "missing_group_type",
	ReasonMissingDeviceID:      "missing_device_id",
	ReasonDependencyCycle:      "dependency_cycle",
	ReasonMissingDependency:    "missing_dependency",
	ReasonInvalidDefinition:    "invalid_definition",
	ReasonMissingDistinctID:    "missing_distinct_id",
	ReasonRegexTimeout:         "regex_timeout",
}

// String returns the reason's snake_case name, as used in metrics and JSON.
func (r Reason) String() string {
	if r < reasonCount {
		return reasonNames[r]
	}
	return "reason(" + strconv.Itoa(int(r)) + ")"
}

// Inconclusive reports whether the reason means "not decidable locally".
func (r Reason) Inconclusive() bool { return r >= ReasonUnknownFlag }

// MarshalText writes the reason's name.
func (r Reason) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// Reasons lists every reason, for metric label pre-registration and docs.
func Reasons() []Reason {
	out := make([]Reason, 0, reasonCount-1)
	for r := ReasonConditionMatch; r < reasonCount; r++ {
		out = append(out, r)
	}
	return out
}

// Result is the answer for one flag.
type Result struct {
	// Key is the flag key.
	Key string
	// Enabled is true when the flag is on (boolean true or any variant).
	Enabled bool
	// Variant is the variant key of a multivariate flag, "" otherwise.
	Variant string
	// Payload is the payload for the value, nil when there is none.
	Payload *Payload
	// Reason says why; Reason.Inconclusive() results have Enabled false.
	Reason Reason
	// Condition is the index of the matching condition, -1 when none matched.
	Condition int
}

// Value is the flag value as PostHog spells it: "true", "false" or the variant key.
func (r Result) Value() string {
	switch {
	case r.Variant != "":
		return r.Variant
	case r.Enabled:
		return "true"
	}
	return "false"
}

// Inconclusive reports whether the flag could not be decided locally.
func (r Result) Inconclusive() bool { return r.Reason.Inconclusive() }

// JSONValue is the value as JSON: true, false or the variant string.
func (r Result) JSONValue() any {
	if r.Variant != "" {
		return r.Variant
	}
	return r.Enabled
}

// MarshalJSON writes {"key", "value", "payload", "reason", "condition_index"}.
func (r Result) MarshalJSON() ([]byte, error) {
	out := struct {
		Key          string          `json:"key"`
		Value        any             `json:"value"`
		Payload      json.RawMessage `json:"payload,omitempty"`
		Reason       Reason          `json:"reason"`
		Inconclusive bool            `json:"inconclusive,omitempty"`
		Condition    *int            `json:"condition_index,omitempty"`
	}{Key: r.Key, Value: r.JSONValue(), Reason: r.Reason, Inconclusive: r.Inconclusive()}
	if r.Payload != nil {
		out.Payload = r.Payload.JSON
	}
	if r.Condition >= 0 {
		c := r.Condition
		out.Condition = &c
	}
	return json.Marshal(out)
}

package flagsapi

import (
	"strconv"

	"github.com/flagsplit/flagsplit/eval"
)

// Reason codes flagsplit adds to PostHog's own.
const (
	// ReasonEdgeInconclusive: the edge could not decide the flag (it needs
	// PostHog's server: experience continuity, static cohorts, properties
	// the request lacks) and no fill-in from PostHog replaced it; the flag
	// is served false, as the proxy routes it.
	ReasonEdgeInconclusive = "edge_inconclusive"
	// ReasonEdgeOverride: an operator's variant override forces the value.
	ReasonEdgeOverride = "edge_override"
)

// FromResult is a flag's answer as the flags API reports it: PostHog's
// reason codes and descriptions (as its feature-flags service writes them)
// for what PostHog would answer, flag_disabled for a kill switch, and the
// edge_ codes for what only the edge says. f is the flag's definition, nil
// for a flag the definitions lack.
func FromResult(f *eval.Flag, r eval.Result) Flag {
	out := Flag{Key: r.Key, Enabled: r.Enabled, Variant: r.Variant, ConditionIndex: -1}
	if f != nil {
		out.ID, out.Version, out.HasExperiment = f.ID, f.Version, f.HasExperiment
	}
	if r.Payload != nil && r.Enabled {
		out.Payload = r.Payload.Raw
	}
	switch r.Reason {
	case eval.ReasonConditionMatch:
		out.Reason, out.ConditionIndex = "condition_match", r.Condition
		out.Description = matchedDescription(r.Condition)
	case eval.ReasonNoConditionMatch:
		out.Reason, out.Description = "no_condition_match", "No matching condition set"
	case eval.ReasonOutOfRollout:
		out.Reason, out.ConditionIndex, out.Description = "out_of_rollout_bound", r.Condition, "Out of rollout bound"
	case eval.ReasonDisabled:
		out.Reason, out.Description = "flag_disabled", "Feature flag is disabled"
	case eval.ReasonNoGroup:
		out.Reason, out.Description = "no_group_type", "No group type"
	case eval.ReasonKilled:
		out.Reason, out.Description = "flag_disabled", "Killed by an override at the edge"
	case eval.ReasonOverride:
		out.Reason, out.Description = ReasonEdgeOverride, "Value set by an override at the edge"
	default:
		out = Inconclusive(f, r.Key, r.Reason)
	}
	return out
}

// Inconclusive is the answer for a flag the edge could not decide: false,
// marked with ReasonEdgeInconclusive and the local reason.
func Inconclusive(f *eval.Flag, key string, reason eval.Reason) Flag {
	out := Flag{Key: key, ConditionIndex: -1, Reason: ReasonEdgeInconclusive,
		Description: inconclusiveDescription(reason)}
	if f != nil {
		out.ID, out.Version, out.HasExperiment = f.ID, f.Version, f.HasExperiment
	}
	return out
}

// Descriptions are prepared once: the response path builds no strings.
var (
	matchedDescriptions      [16]string
	inconclusiveDescriptions [32]string
)

func init() {
	for i := range matchedDescriptions {
		matchedDescriptions[i] = "Matched condition set " + strconv.Itoa(i+1)
	}
	for _, r := range eval.Reasons() {
		if int(r) < len(inconclusiveDescriptions) {
			inconclusiveDescriptions[r] = "Not decidable at the edge (" + r.String() + "); served false"
		}
	}
}

func matchedDescription(i int) string {
	if i >= 0 && i < len(matchedDescriptions) {
		return matchedDescriptions[i]
	}
	return "Matched condition set " + strconv.Itoa(i+1)
}

func inconclusiveDescription(r eval.Reason) string {
	if int(r) < len(inconclusiveDescriptions) && inconclusiveDescriptions[r] != "" {
		return inconclusiveDescriptions[r]
	}
	return "Not decidable at the edge (" + r.String() + "); served false"
}

package posthog

import (
	"encoding/json"
	"time"

	"github.com/google/uuid"

	"github.com/flagsplit/flagsplit/eval"
)

// FlagCalledEvent is the name of PostHog's exposure event.
const FlagCalledEvent = "$feature_flag_called"

// Lib is the $lib property of the events flagsplit sends.
const Lib = "flagsplit"

// Exposure is one subject being served one flag's value by this proxy.
type Exposure struct {
	DistinctID string
	DeviceID   string
	// Flag is the flag's definition (for its id, version and experiment
	// status); nil when unknown.
	Flag *eval.Flag
	// Result is the answer served. Inconclusive answers are not exposures:
	// PostHog's server was not asked, so there is nothing to report.
	Result eval.Result
	// Groups are the subject's groups, by type.
	Groups []eval.Group
	// Minimal is the definitions' minimal_flag_called_events gate.
	Minimal bool
	// Time is when the flag was served.
	Time time.Time
	// LibVersion is reported as $lib_version.
	LibVersion string
}

// Event builds the $feature_flag_called event PostHog's server SDKs send for a
// locally evaluated flag: the same properties, trimmed the same way when the
// server asks for minimal events and the flag backs no experiment.
func (x Exposure) Event() Event {
	value := x.Result.JSONValue()
	props := map[string]any{
		"$feature_flag":          x.Result.Key,
		"$feature_flag_response": value,
		"locally_evaluated":      true,
		"$lib":                   Lib,
		// The event leaves from the proxy, whose address says nothing about
		// where the user is (PostHog's server SDKs disable GeoIP too).
		"$geoip_disable": true,
	}
	if x.LibVersion != "" {
		props["$lib_version"] = x.LibVersion
	}
	minimal := false
	if f := x.Flag; f != nil {
		if f.ID != 0 {
			props["$feature_flag_id"] = f.ID
		}
		if f.Version != 0 {
			props["$feature_flag_version"] = f.Version
		}
		if f.HasExperiment != nil {
			props["$feature_flag_has_experiment"] = *f.HasExperiment
			minimal = x.Minimal && !*f.HasExperiment
		}
	}
	if len(x.Groups) > 0 {
		groups := make(map[string]string, len(x.Groups))
		for _, g := range x.Groups {
			groups[g.Type] = g.Key
		}
		props["$groups"] = groups
	}
	if !minimal {
		props["$feature/"+x.Result.Key] = value
		if x.Result.Payload != nil {
			props["$feature_flag_payload"] = json.RawMessage(x.Result.Payload.JSON)
		}
		if x.DeviceID != "" {
			props["$device_id"] = x.DeviceID
		}
	}
	e := Event{Event: FlagCalledEvent, DistinctID: x.DistinctID, Properties: props, Timestamp: x.Time.UTC()}
	// A time-ordered uuid lets PostHog drop the duplicates a retried batch
	// may deliver.
	if id, err := uuid.NewV7(); err == nil {
		e.UUID = id.String()
	}
	return e
}

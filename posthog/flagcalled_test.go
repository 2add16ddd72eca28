package posthog

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/flagsplit/flagsplit/eval"
)

func exposureDefs(t *testing.T, minimal bool, hasExperiment string) *eval.Definitions {
	t.Helper()
	doc := `{"minimal_flag_called_events": ` + map[bool]string{true: "true", false: "false"}[minimal] + `,
		"flags": [{"id": 42, "key": "hero", "version": 3, "active": true, "has_experiment": ` + hasExperiment + `,
		"filters": {"groups": [{"rollout_percentage": 100}],
			"multivariate": {"variants": [{"key": "test", "rollout_percentage": 100}]},
			"payloads": {"test": "{\"color\": \"red\"}"}}}]}`
	defs, err := eval.Parse([]byte(doc))
	if err != nil || len(defs.Problems()) > 0 {
		t.Fatalf("parse: %v %v", err, defs.Problems())
	}
	return defs
}

func exposureEvent(t *testing.T, defs *eval.Definitions) (Event, map[string]any) {
	t.Helper()
	flag, _ := defs.Flag("hero")
	subject := &eval.Subject{DistinctID: "user-1", DeviceID: "device-1"}
	x := Exposure{DistinctID: "user-1", DeviceID: "device-1", Flag: flag, Result: defs.Evaluate("hero", subject),
		Groups: []eval.Group{{Type: "company", Key: "acme"}}, Minimal: defs.MinimalFlagCalledEvents,
		Time: time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC), LibVersion: "v1.2.3"}
	e := x.Event()
	// Round-trip through JSON, as PostHog receives it.
	data, err := json.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Properties map[string]any `json:"properties"`
	}
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	return e, got.Properties
}

func TestExposureEventCarriesWhatSDKsSend(t *testing.T) {
	e, props := exposureEvent(t, exposureDefs(t, false, "true"))
	if e.Event != "$feature_flag_called" || e.DistinctID != "user-1" || len(e.UUID) != 36 ||
		!e.Timestamp.Equal(time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)) {
		t.Errorf("event %+v", e)
	}
	want := map[string]any{
		"$feature_flag": "hero", "$feature_flag_response": "test", "$feature/hero": "test",
		"locally_evaluated": true, "$feature_flag_id": float64(42), "$feature_flag_version": float64(3),
		"$feature_flag_has_experiment": true, "$groups": map[string]any{"company": "acme"},
		"$device_id": "device-1", "$lib": "flagsplit", "$lib_version": "v1.2.3", "$geoip_disable": true,
		"$feature_flag_payload": map[string]any{"color": "red"},
	}
	for k, v := range want {
		if got, _ := json.Marshal(props[k]); string(got) != mustJSON(t, v) {
			t.Errorf("%s = %s, want %s", k, got, mustJSON(t, v))
		}
	}
	if len(props) != len(want) {
		t.Errorf("properties %v, want exactly %v", props, want)
	}
}

func TestMinimalExposureEventWhenServerAsksAndNoExperiment(t *testing.T) {
	_, props := exposureEvent(t, exposureDefs(t, true, "false"))
	for _, k := range []string{"$feature/hero", "$feature_flag_payload", "$device_id"} {
		if _, ok := props[k]; ok {
			t.Errorf("minimal event keeps %s", k)
		}
	}
	for _, k := range []string{"$feature_flag", "$feature_flag_response", "$feature_flag_id", "$feature_flag_version",
		"$feature_flag_has_experiment", "locally_evaluated", "$groups", "$lib"} {
		if _, ok := props[k]; !ok {
			t.Errorf("minimal event lacks %s", k)
		}
	}
	// The gate alone is not enough: a flag backing an experiment, or one whose
	// experiment status is unknown, keeps the full event.
	for _, has := range []string{"true", "null"} {
		if _, props := exposureEvent(t, exposureDefs(t, true, has)); props["$feature/hero"] != "test" {
			t.Errorf("has_experiment %s: event trimmed: %v", has, props)
		}
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

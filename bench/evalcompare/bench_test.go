package evalcompare

import (
	"testing"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/posthog/posthog-go"
)

// Each benchmark runs the same definitions, distinct ids (ids[i%1024]) and
// person properties through both evaluators:
//
//   - flagsplit: Definitions.Evaluate for one flag, FlagSet.Evaluate for all;
//   - posthog-go: Client.GetFeatureFlag and Client.GetAllFlags with
//     OnlyEvaluateLocally, no $feature_flag_called events, definitions polled
//     once from a loopback server before timing starts.
//
// posthog-go gets its payload maps (properties, groups, group properties) built
// once outside the loop, so its allocations are its evaluator's own, not the
// caller's. Both sides are checked after the loop: the answers are conclusive
// and posthog-go made no request besides its start-up poll.

// BenchmarkRollout: one flag, 45 % rollout, no properties.
func BenchmarkRollout(b *testing.B) { benchOne(b, rolloutDoc, "simple-flag", propSet{}) }

// BenchmarkMultivariate: one flag, 5 variants (50/20/20/5/5), rollout 100 %.
func BenchmarkMultivariate(b *testing.B) {
	benchOne(b, multivariateDoc, "multivariate-flag", propSet{})
}

// BenchmarkFiveFilters: one flag with exact, icontains, regex, gt and is_not
// filters, all matching.
func BenchmarkFiveFilters(b *testing.B) { benchOne(b, fiveFiltersDoc, "filtered-flag", benchPerson) }

// BenchmarkFiftyFlags: all 50 flags of fiftyFlagsDoc for one subject.
func BenchmarkFiftyFlags(b *testing.B) {
	person, props := benchPerson.flagsplit(), benchPerson.posthog()

	b.Run("flagsplit", func(b *testing.B) {
		set := mustParse(b, fiftyFlagsDoc).FlagSet(nil)
		var r eval.Results
		s := eval.Subject{Person: person}
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			s.DistinctID = ids[i&1023]
			set.Evaluate(&s, &r)
		}
		if r.Len() != 50 {
			b.Fatalf("%d results", r.Len())
		}
		for i := 0; i < r.Len(); i++ {
			if r.Reason(i).Inconclusive() {
				b.Fatalf("%s: inconclusive (%s)", r.Key(i), r.Reason(i))
			}
		}
	})

	b.Run("posthog-go", func(b *testing.B) {
		ph := newPosthogSide(b, fiftyFlagsDoc)
		payload := posthog.FeatureFlagPayloadNoKey{
			PersonProperties:      props,
			Groups:                posthog.Groups{},
			GroupProperties:       map[string]posthog.Properties{},
			OnlyEvaluateLocally:   true,
			SendFeatureFlagEvents: noEvents,
		}
		var all map[string]any
		var err error
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			payload.DistinctId = ids[i&1023]
			all, err = ph.client.GetAllFlags(payload)
		}
		if err != nil || len(all) != 50 {
			b.Fatalf("GetAllFlags: %d flags, %v", len(all), err)
		}
		ph.checkQuiet(b)
	})
}

// benchOne benchmarks one flag on both sides.
func benchOne(b *testing.B, doc, key string, ps propSet) {
	b.Run("flagsplit", func(b *testing.B) {
		defs := mustParse(b, doc)
		s := eval.Subject{Person: ps.flagsplit()}
		var r eval.Result
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			s.DistinctID = ids[i&1023]
			r = defs.Evaluate(key, &s)
		}
		if r.Inconclusive() {
			b.Fatalf("inconclusive: %s", r.Reason)
		}
	})

	b.Run("posthog-go", func(b *testing.B) {
		ph := newPosthogSide(b, doc)
		payload := posthog.FeatureFlagPayload{
			Key:                   key,
			PersonProperties:      ps.posthog(),
			Groups:                posthog.Groups{},
			GroupProperties:       map[string]posthog.Properties{},
			OnlyEvaluateLocally:   true,
			SendFeatureFlagEvents: noEvents,
		}
		var v any
		var err error
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			payload.DistinctId = ids[i&1023]
			v, err = ph.client.GetFeatureFlag(payload)
		}
		if err != nil || v == nil {
			b.Fatalf("GetFeatureFlag: %v, %v", v, err)
		}
		ph.checkQuiet(b)
	})
}

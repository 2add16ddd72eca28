package rollout

import (
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/flagsplit/flagsplit/storedoc/storedoctest"
)

// The ratio test's false alarms stay within alpha under the null, however
// long it watches and however the expected share moves between trials (the
// steps of a ramp): 400 seeded runs of 3000 users each, the share moving
// through 5, 25 and 50 %.
func TestRatioTestFalseAlarmsStayWithinAlpha(t *testing.T) {
	const runs, users, alpha = 400, 3000, 0.05
	rng := rand.New(rand.NewPCG(1, 2))
	shares := []float64{0.05, 0.25, 0.5}
	alarms := 0
	for range runs {
		rt := newRatioTest(alpha)
		for i := range users {
			q := shares[i*len(shares)/users]
			if rng.Float64() < q {
				rt.Fold(q, 1, 0)
			} else {
				rt.Fold(q, 0, 1)
			}
		}
		if rt.Breached() {
			alarms++
		}
	}
	// Ville's bound is alpha; the binomial(400, 0.05) 99.9 % quantile is 33.
	if alarms > 33 {
		t.Fatalf("%d false alarms in %d runs: more than alpha = %v allows", alarms, runs, alpha)
	}
	t.Logf("%d false alarms in %d runs (alpha %v)", alarms, runs, alpha)
}

// A split of 40 % where 50 % is configured is found within a few thousand
// users, in either direction, and a gross one (a third of treatment's users
// sent back) within a few hundred.
func TestRatioTestFindsMismatches(t *testing.T) {
	for _, c := range []struct {
		q, observed float64
		within      int
	}{{0.5, 0.4, 3000}, {0.5, 0.6, 3000}, {0.25, 0.25 * 2 / 3, 1500}, {0.5, 1.0 / 3, 400}} {
		rng := rand.New(rand.NewPCG(3, 4))
		rt := newRatioTest(0.05)
		n := 0
		for !rt.Breached() && n < c.within {
			if rng.Float64() < c.observed {
				rt.Fold(c.q, 1, 0)
			} else {
				rt.Fold(c.q, 0, 1)
			}
			n++
		}
		if !rt.Breached() {
			t.Errorf("share %v observed where %v is expected: no mismatch after %d users (e-value %.3g)", c.observed, c.q, n, rt.EValue())
		}
	}
	// Folding a batch is folding its trials one by one.
	a, b := newRatioTest(0.05), newRatioTest(0.05)
	a.Fold(0.3, 7, 11)
	for range 7 {
		b.Fold(0.3, 1, 0)
	}
	for range 11 {
		b.Fold(0.3, 0, 1)
	}
	if d := a.EValue() / b.EValue(); d < 0.999999 || d > 1.000001 {
		t.Errorf("batch e-value %v, one by one %v", a.EValue(), b.EValue())
	}
	if _, err := NewRatioTest(1); err == nil {
		t.Error("alpha 1 accepted")
	}
}

// The user sample counts each user once, holds a bounded number of them
// whatever the number of users, and keeps sampling new users (at a lower
// rate) once full.
func TestUserSampleCountsEachUserOnceInBoundedMemory(t *testing.T) {
	s := newUserSample()
	for round := range 3 {
		for i := range 500 {
			s.observe(fmt.Sprintf("u-%d", i), Arm(i%2), 0.5)
		}
		got := s.take()
		if round == 0 && (len(got) != 1 || got[0.5][Treatment] != 250 || got[0.5][Control] != 250) {
			t.Fatalf("first visits: %v", got)
		}
		if round > 0 && got != nil {
			t.Fatalf("returning users counted again: %v", got[0.5])
		}
	}
	var total uint64
	for i := range 200_000 {
		s.observe(fmt.Sprintf("many-%d", i), Arm(i%2), 0.5)
		if s.n > userSampleCap {
			t.Fatalf("sample holds %d users, more than %d", s.n, userSampleCap)
		}
	}
	for _, c := range s.take() {
		total += c[Treatment] + c[Control]
	}
	if s.rate() >= 0.1 || total < 8000 || total > 50_000 {
		t.Fatalf("after 200000 users: rate %v, %d counted", s.rate(), total)
	}
}

// ratioRamp is a ramp at 50 % whose steps are due at once.
func ratioRamp(t *testing.T) *Ramp {
	return newTestRamp(t, Config{Steps: []float64{50, 100}, MinRequests: 10, OnBreach: Rollback}, t0)
}

// users reports n new users, a share inTreatment of them served by
// treatment, each with one request.
func users(r *Ramp, prefix string, n int, inTreatment float64, share float64) {
	for i := range n {
		arm := Control
		if float64(i%100) < inTreatment*100 {
			arm = Treatment
		}
		r.Observe(arm, false, time.Millisecond)
		r.ObserveUser(fmt.Sprintf("%s-%d", prefix, i), arm, share)
	}
}

// A biased split holds the ramp, whatever on_breach says, although its step
// has lasted long enough and carried enough requests; an honest one promotes.
func TestASampleRatioMismatchHoldsTheRamp(t *testing.T) {
	r := ratioRamp(t)
	users(r, "biased", 600, 0.33, 0.5)
	ev := r.Tick(t0.Add(time.Minute))
	wantEvent(t, ev, EventHeld, 50, 50)
	if ev.Guardrail != SampleRatioGuard {
		t.Fatalf("event %+v: want guardrail %s", ev, SampleRatioGuard)
	}
	st := r.Status()
	if st.State != Held || !st.SampleRatio.Mismatch || st.SampleRatio.ExpectedShare == nil || *st.SampleRatio.ExpectedShare != 0.5 ||
		st.Enforced != (Cap{Percentage: 50}) || !strings.Contains(st.Reason, "sample_ratio") {
		t.Fatalf("status after the mismatch: %+v", st)
	}
	if got := st.SampleRatio.TreatmentUsers + st.SampleRatio.ControlUsers; got != 600 {
		t.Errorf("%d users tested, want 600", got)
	}
	// Held: no promotion however long it waits; resuming starts the check
	// over, and an honest split then promotes.
	users(r, "more", 100, 0.5, 0.5)
	wantNoEvent(t, r.Tick(t0.Add(time.Hour)))
	if err := r.Resume(t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if st := r.Status(); st.SampleRatio.Mismatch || st.SampleRatio.TreatmentUsers != 0 {
		t.Fatalf("resume kept the mismatch: %+v", st.SampleRatio)
	}
	users(r, "honest", 600, 0.5, 0.5)
	wantEvent(t, r.Tick(t0.Add(2*time.Hour)), EventPromoted, 50, 100)

	// Users whose share is unknown are not tested.
	r = ratioRamp(t)
	users(r, "unknown", 600, 0.1, nan())
	wantEvent(t, r.Tick(t0.Add(time.Minute)), EventPromoted, 50, 100)
	if st := r.Status(); st.SampleRatio.ExpectedShare != nil || st.SampleRatio.ControlUsers != 0 {
		t.Errorf("unknown share tested: %+v", st.SampleRatio)
	}
}

// A dry run goes through its states as an enforced ramp would, reporting
// them, while its Cap never limits the flag; its rollback kills nothing.
func TestADryRunIsJudgedButNeverEnforced(t *testing.T) {
	cfg := errorRateConfig(Rollback)
	cfg.DryRun = true
	r := newTestRamp(t, cfg, t0)
	if r.Cap() != (Cap{Percentage: 100}) || r.Percentage() != 5 || !r.Status().DryRun {
		t.Fatalf("dry run at start: cap %+v, percentage %v", r.Cap(), r.Percentage())
	}
	feed(r, Treatment, 100, false, 0)
	feed(r, Control, 100, false, 0)
	wantEvent(t, r.Tick(t0.Add(time.Minute)), EventPromoted, 5, 25)
	breachingTraffic(r)
	wantEvent(t, r.Tick(t0.Add(time.Minute)), EventRolledBack, 25, 0)
	if st := r.Status(); st.State != RolledBack || st.Enforced != (Cap{Percentage: 100}) || !st.DryRun {
		t.Fatalf("dry run after its rollback: %+v", st)
	}
	if err := r.Restore(Progress{State: Aborted, Step: 0, StepStartedAt: t0}); err != nil || r.Cap() != (Cap{Percentage: 100}) {
		t.Fatalf("restored abort of a dry run: cap %+v (%v)", r.Cap(), err)
	}

	// The same ramp enforced kills the flag.
	cfg.DryRun = false
	r = newTestRamp(t, cfg, t0)
	if r.Cap() != (Cap{Percentage: 5}) {
		t.Fatalf("enforced at start: %+v", r.Cap())
	}
	breachingTraffic(r)
	r.Tick(t0)
	if r.Cap() != (Cap{Percentage: 0, Killed: true}) {
		t.Fatalf("enforced after its rollback: %+v", r.Cap())
	}
}

// The runtime's rollback of a dry run sets no kill override, and reports the
// change as a dry run's; an enforced one sets it.
func TestTheRuntimeKillsOnlyForAnEnforcedRollback(t *testing.T) {
	for _, dry := range []bool{true, false} {
		clock := &fakeClock{now: time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)}
		cfg := runtimeConfig()
		cfg.DryRun = dry
		in := newInstance(t, storedoctest.NewMemory(), clock, cfg)
		in.serve(200, true)
		in.tick()
		in.want(RolledBack, 0)
		ch := in.lastChange()
		if ch.Kind != EventRolledBack || ch.DryRun != dry {
			t.Fatalf("dry run %v: change %+v", dry, ch)
		}
		in.mu.Lock()
		kills := len(in.kills)
		in.mu.Unlock()
		if want := map[bool]int{true: 0, false: 1}[dry]; kills != want {
			t.Errorf("dry run %v: %d kills, want %d", dry, kills, want)
		}
		if st := in.run().Status(); st.KillOverride == dry {
			t.Errorf("dry run %v: kill override %v", dry, st.KillOverride)
		}
	}
}

func nan() float64 { return math.NaN() }

// Turning a dry run into an enforced rollout starts it from its first step,
// after a reload as after a restart: what the dry run reached was never
// enforced, so no user has been exposed at its step yet.
func TestAnEnforcedRolloutDoesNotCarryOnFromADryRun(t *testing.T) {
	st := storedoctest.NewMemory()
	clock := &fakeClock{now: time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)}
	dry := runtimeConfig()
	dry.DryRun = true
	in := newInstance(t, st, clock, dry)
	in.serve(30, false)
	clock.Advance(2 * time.Minute)
	in.tick()
	in.want(Running, 1)

	// A reload of the same instance with dry_run off.
	in.start(runtimeConfig(), st)
	in.want(Running, 0)
	if in.run().Ramp().Cap() != (Cap{Percentage: 10}) {
		t.Fatalf("enforced after the dry run: %+v", in.run().Ramp().Cap())
	}
	// A restart (a new runtime over the same storage) likewise.
	restarted := newInstance(t, st, clock, runtimeConfig())
	restarted.want(Running, 0)
	// While a dry run restarted carries on where it was.
	again := newInstance(t, st, clock, dry)
	again.want(Running, 1)
}

// BenchmarkObserveUser is the sample-ratio check's request path: a user
// outside the sample (after it has been full a few times) costs a hash and
// an atomic load; one inside it takes the sample's lock.
func BenchmarkObserveUser(b *testing.B) {
	ids := make([]string, 1<<16)
	for i := range ids {
		ids[i] = fmt.Sprintf("user-%d", i)
	}
	r := newTestRamp(b, Config{Steps: []float64{50, 100}}, t0)
	for _, id := range ids {
		r.ObserveUser(id, Control, 0.5)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			r.ObserveUser(ids[i&(1<<16-1)], Arm(i&1), 0.5)
			i++
		}
	})
}

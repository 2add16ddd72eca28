package rollout

import (
	"encoding/json"
	"errors"
	"math"
	"math/rand/v2"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

var t0 = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

func errorRateConfig(onBreach BreachAction) Config {
	return Config{
		Steps:        []float64{5, 25, 50, 100},
		StepDuration: time.Minute,
		MinRequests:  100,
		Guardrails:   []GuardrailConfig{{Kind: KindErrorRate, Factor: 2}},
		OnBreach:     onBreach,
	}
}

func newTestRamp(t testing.TB, cfg Config, now time.Time) *Ramp {
	t.Helper()
	r, err := NewRamp(cfg, now)
	if err != nil {
		t.Fatalf("NewRamp: %v", err)
	}
	return r
}

// feed observes n requests of one kind.
func feed(r *Ramp, arm Arm, n int, failed bool, latency time.Duration) {
	for range n {
		r.Observe(arm, failed, latency)
	}
}

func wantEvent(t *testing.T, got Event, kind string, from, to float64) {
	t.Helper()
	if got.Kind != kind || got.From != from || got.To != to {
		t.Fatalf("event = %+v, want %s %v -> %v", got, kind, from, to)
	}
}

func wantNoEvent(t *testing.T, got Event) {
	t.Helper()
	if got != (Event{}) {
		t.Fatalf("event = %+v, want none", got)
	}
}

func TestConfigValidate(t *testing.T) {
	good := errorRateConfig(Rollback)
	good.Guardrails = append(good.Guardrails, GuardrailConfig{Kind: KindLatency, Quantile: 0.99, Delta: 250 * time.Millisecond})
	if err := good.Validate(); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	for name, mutate := range map[string]func(*Config){
		"no steps":             func(c *Config) { c.Steps = nil },
		"equal steps":          func(c *Config) { c.Steps = []float64{5, 5, 50} },
		"decreasing steps":     func(c *Config) { c.Steps = []float64{50, 25} },
		"step over 100":        func(c *Config) { c.Steps = []float64{50, 101} },
		"zero step":            func(c *Config) { c.Steps = []float64{0, 50} },
		"negative step":        func(c *Config) { c.Steps = []float64{-5, 50} },
		"NaN step":             func(c *Config) { c.Steps = []float64{math.NaN()} },
		"negative duration":    func(c *Config) { c.StepDuration = -time.Second },
		"unknown kind":         func(c *Config) { c.Guardrails[0].Kind = "throughput" },
		"factor below 1":       func(c *Config) { c.Guardrails[0].Factor = 0.5 },
		"zero error factor":    func(c *Config) { c.Guardrails[0].Factor = 0 },
		"infinite factor":      func(c *Config) { c.Guardrails[0].Factor = math.Inf(1) },
		"latency factor < 1":   func(c *Config) { c.Guardrails[1].Factor = 0.9 },
		"latency quantile 0":   func(c *Config) { c.Guardrails[1].Quantile = 0 },
		"latency quantile 1":   func(c *Config) { c.Guardrails[1].Quantile = 1 },
		"negative delta":       func(c *Config) { c.Guardrails[1].Delta = -time.Millisecond },
		"unknown breach":       func(c *Config) { c.OnBreach = 7 },
		"alpha 1":              func(c *Config) { c.Alpha = 1 },
		"negative alpha":       func(c *Config) { c.Alpha = -0.05 },
		"NaN alpha":            func(c *Config) { c.Alpha = math.NaN() },
		"empty guardrail kind": func(c *Config) { c.Guardrails[0].Kind = "" },
	} {
		c := good
		c.Steps = append([]float64(nil), good.Steps...)
		c.Guardrails = append([]GuardrailConfig(nil), good.Guardrails...)
		mutate(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("%s: Validate accepted %+v", name, c)
		}
		if _, err := NewRamp(c, t0); err == nil {
			t.Errorf("%s: NewRamp accepted the config", name)
		}
	}
}

func TestGuardrailNames(t *testing.T) {
	for _, c := range []struct {
		g    GuardrailConfig
		want string
	}{
		{GuardrailConfig{Kind: KindErrorRate, Factor: 2}, "error_rate 2x"},
		{GuardrailConfig{Kind: KindErrorRate, Factor: 1.5}, "error_rate 1.5x"},
		{GuardrailConfig{Kind: KindLatency, Quantile: 0.99, Delta: 250 * time.Millisecond}, "latency p99 +250ms"},
		{GuardrailConfig{Kind: KindLatency, Quantile: 0.999, Delta: time.Second}, "latency p99.9 +1s"},
		{GuardrailConfig{Kind: KindLatency, Quantile: 0.5, Delta: 0, Factor: 2}, "latency p50 +0s 2x"},
	} {
		if got := c.g.String(); got != c.want {
			t.Errorf("%+v: String() = %q, want %q", c.g, got, c.want)
		}
	}
}

func TestRampPromotesAfterDurationAndMinRequests(t *testing.T) {
	r := newTestRamp(t, errorRateConfig(Rollback), t0)
	if p := r.Percentage(); p != 5 {
		t.Fatalf("initial percentage = %v, want 5", p)
	}

	// Enough treatment requests, but the step has not lasted a minute.
	feed(r, Treatment, 150, false, 0)
	feed(r, Control, 1000, false, 0)
	wantNoEvent(t, r.Tick(t0.Add(59*time.Second)))

	// A fresh ramp past the duration but short of treatment requests.
	r = newTestRamp(t, errorRateConfig(Rollback), t0)
	feed(r, Control, 1000, false, 0)
	feed(r, Treatment, 99, false, 0)
	wantNoEvent(t, r.Tick(t0.Add(2*time.Minute)))
	feed(r, Treatment, 1, false, 0)
	now := t0.Add(3 * time.Minute)
	wantEvent(t, r.Tick(now), EventPromoted, 5, 25)
	if p := r.Percentage(); p != 25 {
		t.Fatalf("percentage after promotion = %v, want 25", p)
	}
	st := r.Status()
	if st.State != Running || st.Step != 1 || !st.StepStartedAt.Equal(now) {
		t.Fatalf("status after promotion: state %s, step %d, started %v", st.State, st.Step, st.StepStartedAt)
	}
	if st.OnStep != (Counts{}) {
		t.Errorf("per-step counts after promotion = %+v, want zero", st.OnStep)
	}
	wantTotal := Counts{Control: ArmCounts{Requests: 1000}, Treatment: ArmCounts{Requests: 100}}
	if st.Total != wantTotal {
		t.Errorf("total counts = %+v, want %+v", st.Total, wantTotal)
	}

	// The new step needs its own minute and its own 100 treatment requests.
	feed(r, Treatment, 100, false, 0)
	feed(r, Control, 300, false, 0)
	wantNoEvent(t, r.Tick(now.Add(30*time.Second)))
	now = now.Add(time.Minute)
	wantEvent(t, r.Tick(now), EventPromoted, 25, 50)
	feed(r, Treatment, 100, false, 0)
	now = now.Add(time.Minute)
	wantEvent(t, r.Tick(now), EventPromoted, 50, 100)
	feed(r, Treatment, 100, false, 0)
	now = now.Add(time.Minute)
	wantEvent(t, r.Tick(now), EventCompleted, 100, 100)
	if r.Percentage() != 100 || r.Cap().Killed || r.State() != Completed {
		t.Fatalf("after completion: percentage %v, killed %v, state %s", r.Percentage(), r.Cap().Killed, r.State())
	}
	feed(r, Treatment, 1000, true, 0)
	wantNoEvent(t, r.Tick(now.Add(time.Hour)))
}

func TestRampCompletesToFullRollout(t *testing.T) {
	cfg := Config{Steps: []float64{10, 50}}
	r := newTestRamp(t, cfg, t0)
	wantEvent(t, r.Tick(t0), EventPromoted, 10, 50)
	wantEvent(t, r.Tick(t0), EventCompleted, 50, 100)
	if p := r.Percentage(); p != 100 {
		t.Errorf("percentage once completed = %v, want 100", p)
	}
}

// breachingTraffic makes treatment fail far more often than twice control's rate.
func breachingTraffic(r *Ramp) {
	feed(r, Control, 1000, false, 0)
	feed(r, Control, 10, true, 0)
	feed(r, Treatment, 900, false, 0)
	feed(r, Treatment, 100, true, 0)
}

func TestRampBreachRollsBack(t *testing.T) {
	cfg := errorRateConfig(Rollback)
	cfg.Steps = []float64{50, 100}
	cfg.StepDuration = 0
	cfg.MinRequests = 0
	r := newTestRamp(t, cfg, t0)
	breachingTraffic(r)
	ev := r.Tick(t0.Add(time.Second))
	wantEvent(t, ev, EventRolledBack, 50, 0)
	if ev.Guardrail != "error_rate 2x" || ev.EValue < 20 {
		t.Errorf("breach event %+v: want guardrail %q and an e-value of at least 20", ev, "error_rate 2x")
	}
	if r.Percentage() != 0 || !r.Cap().Killed || r.State() != RolledBack {
		t.Fatalf("after rollback: percentage %v, killed %v, state %s", r.Percentage(), r.Cap().Killed, r.State())
	}
	st := r.Status()
	if !strings.Contains(st.Reason, "error_rate 2x") || len(st.Guardrails) != 1 || !st.Guardrails[0].Breached {
		t.Errorf("status after rollback: %+v", st)
	}
	if _, err := json.Marshal(st); err != nil {
		t.Errorf("status does not marshal: %v", err)
	}
	// Rolled back is final: no promotion, even with an elapsed step and healthy traffic.
	feed(r, Treatment, 1000, false, 0)
	wantNoEvent(t, r.Tick(t0.Add(time.Hour)))
	for name, op := range map[string]func(time.Time) error{"Pause": r.Pause, "Resume": r.Resume, "Promote": r.Promote, "Abort": r.Abort} {
		if err := op(t0.Add(time.Hour)); !errors.Is(err, ErrInvalidTransition) {
			t.Errorf("%s after rollback: error %v, want ErrInvalidTransition", name, err)
		}
	}
	if r.Percentage() != 0 || !r.Cap().Killed {
		t.Errorf("rollback undone by a refused operation")
	}
}

func TestRampBreachHolds(t *testing.T) {
	cfg := errorRateConfig(Hold)
	cfg.Steps = []float64{50, 100}
	r := newTestRamp(t, cfg, t0)
	breachingTraffic(r)
	ev := r.Tick(t0.Add(2 * time.Minute))
	wantEvent(t, ev, EventHeld, 50, 50)
	if r.Percentage() != 50 || r.Cap().Killed || r.State() != Held {
		t.Fatalf("after hold: percentage %v, killed %v, state %s", r.Percentage(), r.Cap().Killed, r.State())
	}
	// Held neither re-reports nor promotes.
	feed(r, Treatment, 500, false, 0)
	wantNoEvent(t, r.Tick(t0.Add(time.Hour)))
	if err := r.Pause(t0.Add(time.Hour)); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("Pause while held: %v, want ErrInvalidTransition", err)
	}

	resumed := t0.Add(2 * time.Hour)
	if err := r.Resume(resumed); err != nil {
		t.Fatalf("Resume from held: %v", err)
	}
	st := r.Status()
	if st.State != Running || st.Reason != "" || !st.StepStartedAt.Equal(resumed) || st.OnStep != (Counts{}) {
		t.Fatalf("after resuming from held: %+v", st)
	}
	if g := st.Guardrails[0]; g.EValue != 1 || g.Breached || g.TreatmentEvents != 0 || g.ControlEvents != 0 {
		t.Errorf("guardrail after resuming from held = %+v, want fresh statistics", g)
	}
	// The step starts over: it needs its full duration again.
	feed(r, Control, 1000, false, 0)
	feed(r, Treatment, 1000, false, 0)
	wantNoEvent(t, r.Tick(resumed.Add(30*time.Second)))
	wantEvent(t, r.Tick(resumed.Add(time.Minute)), EventPromoted, 50, 100)
}

func TestRampPauseAndResume(t *testing.T) {
	r := newTestRamp(t, errorRateConfig(Rollback), t0)
	if err := r.Pause(t0.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := r.Pause(t0.Add(time.Second)); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("second Pause: %v, want ErrInvalidTransition", err)
	}
	// Paused: a finished step is not promoted, and the percentage holds.
	feed(r, Control, 1000, false, 0)
	feed(r, Treatment, 200, false, 0)
	wantNoEvent(t, r.Tick(t0.Add(10*time.Minute)))
	if r.Percentage() != 5 || r.State() != Paused {
		t.Fatalf("while paused: percentage %v, state %s", r.Percentage(), r.State())
	}
	// Observations still count while paused.
	if st := r.Status(); st.OnStep.Treatment.Requests != 200 {
		t.Errorf("treatment requests on the paused step = %d, want 200", st.OnStep.Treatment.Requests)
	}
	if err := r.Resume(t0.Add(11 * time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := r.Resume(t0.Add(11 * time.Minute)); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("Resume while running: %v, want ErrInvalidTransition", err)
	}
	// Time spent paused counted towards the step.
	wantEvent(t, r.Tick(t0.Add(11*time.Minute)), EventPromoted, 5, 25)
}

func TestRampBreachWhilePaused(t *testing.T) {
	cfg := errorRateConfig(Rollback)
	cfg.Steps = []float64{50, 100}
	r := newTestRamp(t, cfg, t0)
	if err := r.Pause(t0); err != nil {
		t.Fatal(err)
	}
	breachingTraffic(r)
	wantEvent(t, r.Tick(t0.Add(time.Second)), EventRolledBack, 50, 0)
	if !r.Cap().Killed {
		t.Error("not killed after a breach while paused")
	}
}

func TestRampPromoteAndAbort(t *testing.T) {
	r := newTestRamp(t, errorRateConfig(Rollback), t0)
	if err := r.Promote(t0.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if p := r.Percentage(); p != 25 {
		t.Fatalf("after Promote: percentage %v, want 25", p)
	}
	if err := r.Pause(t0.Add(2 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := r.Promote(t0.Add(3 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if r.Percentage() != 50 || r.State() != Paused {
		t.Fatalf("Promote while paused: percentage %v, state %s; want 50, paused", r.Percentage(), r.State())
	}
	if err := r.Promote(t0.Add(4 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := r.Promote(t0.Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if r.State() != Completed || r.Percentage() != 100 {
		t.Fatalf("Promote on the last step: state %s, percentage %v; want completed, 100", r.State(), r.Percentage())
	}
	for name, op := range map[string]func(time.Time) error{"Pause": r.Pause, "Resume": r.Resume, "Promote": r.Promote, "Abort": r.Abort} {
		if err := op(t0.Add(time.Minute)); !errors.Is(err, ErrInvalidTransition) {
			t.Errorf("%s after completion: error %v, want ErrInvalidTransition", name, err)
		}
	}

	for _, from := range []State{Running, Paused, Held} {
		cfg := errorRateConfig(Hold)
		r := newTestRamp(t, cfg, t0)
		switch from {
		case Paused:
			if err := r.Pause(t0); err != nil {
				t.Fatal(err)
			}
		case Held:
			cfg.Steps = []float64{50, 100}
			r = newTestRamp(t, cfg, t0)
			breachingTraffic(r)
			wantEvent(t, r.Tick(t0), EventHeld, 50, 50)
		}
		if err := r.Abort(t0.Add(time.Second)); err != nil {
			t.Fatalf("Abort from %s: %v", from, err)
		}
		if r.State() != Aborted || r.Percentage() != 0 || !r.Cap().Killed {
			t.Errorf("Abort from %s: state %s, percentage %v, killed %v", from, r.State(), r.Percentage(), r.Cap().Killed)
		}
		if err := r.Abort(t0.Add(time.Second)); !errors.Is(err, ErrInvalidTransition) {
			t.Errorf("second Abort: %v, want ErrInvalidTransition", err)
		}
	}
}

func TestProgressRoundTrip(t *testing.T) {
	cfg := errorRateConfig(Hold)
	cfg.Steps = []float64{5, 50, 100}
	r := newTestRamp(t, cfg, t0)
	if err := r.Promote(t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	breachingTraffic(r)
	wantEvent(t, r.Tick(t0.Add(2*time.Minute)), EventHeld, 50, 50)

	data, err := json.Marshal(r.Progress())
	if err != nil {
		t.Fatal(err)
	}
	var p Progress
	if err := json.Unmarshal(data, &p); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(p, r.Progress()) {
		t.Fatalf("progress after a JSON round trip = %+v, want %+v", p, r.Progress())
	}

	restarted := newTestRamp(t, cfg, t0.Add(time.Hour))
	if err := restarted.Restore(p); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	before, after := r.Status(), restarted.Status()
	if after.State != Held || after.Step != 1 || after.Percentage != 50 || restarted.Percentage() != 50 ||
		!after.StepStartedAt.Equal(before.StepStartedAt) || after.Reason != before.Reason || !after.ChangedAt.Equal(before.ChangedAt) {
		t.Fatalf("restored status = %+v, want the state of %+v", after, before)
	}
	if g := after.Guardrails[0]; g.EValue != 1 || g.Breached {
		t.Errorf("restored guardrail = %+v, want fresh statistics", g)
	}
	// The restored ramp carries on: resume, then promote on the step's terms.
	if err := restarted.Resume(t0.Add(2 * time.Hour)); err != nil {
		t.Fatal(err)
	}
	feed(restarted, Treatment, 100, false, 0)
	feed(restarted, Control, 100, false, 0)
	wantEvent(t, restarted.Tick(t0.Add(3*time.Hour)), EventPromoted, 50, 100)

	// A rolled-back ramp stays killed across a restart.
	killed := newTestRamp(t, cfg, t0)
	if err := killed.Restore(Progress{State: RolledBack, Step: 0, StepStartedAt: t0, Reason: "error_rate 2x"}); err != nil {
		t.Fatal(err)
	}
	if !killed.Cap().Killed || killed.Percentage() != 0 {
		t.Errorf("restored rolled-back ramp: killed %v, percentage %v", killed.Cap().Killed, killed.Percentage())
	}

	// A running ramp resumes its step clock from the saved start time.
	running := newTestRamp(t, cfg, t0.Add(time.Hour))
	if err := running.Restore(Progress{State: Running, Step: 0, StepPercentage: 5, StepStartedAt: t0}); err != nil {
		t.Fatal(err)
	}
	feed(running, Treatment, 100, false, 0)
	wantEvent(t, running.Tick(t0.Add(time.Hour)), EventPromoted, 5, 50)
}

func TestRestoreRejectsInconsistentProgress(t *testing.T) {
	cfg := errorRateConfig(Rollback)
	for name, p := range map[string]Progress{
		"unknown state":      {State: "dancing", Step: 0, StepStartedAt: t0},
		"empty state":        {Step: 0, StepStartedAt: t0},
		"negative step":      {State: Running, Step: -1, StepStartedAt: t0},
		"step out of range":  {State: Running, Step: 4, StepStartedAt: t0},
		"changed percentage": {State: Running, Step: 1, StepPercentage: 20, StepStartedAt: t0},
		"no start time":      {State: Running, Step: 1},
	} {
		r := newTestRamp(t, cfg, t0)
		if err := r.Restore(p); err == nil {
			t.Errorf("%s: Restore(%+v) succeeded", name, p)
		}
		if st := r.Status(); st.State != Running || st.Step != 0 || r.Percentage() != 5 {
			t.Errorf("%s: refused Restore changed the ramp: %+v", name, st)
		}
	}
}

// TestRampToleratesSkewedRequestShare runs whole ramps end to end in which
// treatment users send twice their share of requests with the same error
// rate as control users, against a strict (1x) error guardrail: the ramps
// must complete, bar at most alpha of them.
func TestRampToleratesSkewedRequestShare(t *testing.T) {
	t.Parallel()
	const runs = 400
	cfg := Config{
		Steps:        []float64{5, 25, 50, 100},
		StepDuration: 50 * time.Second,
		MinRequests:  1,
		Guardrails:   []GuardrailConfig{{Kind: KindErrorRate, Factor: 1}},
	}
	rng := newRNG(50)
	falseAlarms := 0
	for range runs {
		r := newTestRamp(t, cfg, t0)
		now := t0
		for r.State() == Running {
			share := r.Percentage() / 100
			share = 2 * share / (1 + share)
			for range batch {
				arm := Control
				if rng.Float64() < share {
					arm = Treatment
				}
				r.Observe(arm, rng.Float64() < 0.01, 0)
			}
			now = now.Add(time.Second)
			r.Tick(now)
		}
		switch r.State() {
		case RolledBack:
			falseAlarms++
		case Completed:
		default:
			t.Fatalf("ramp ended in state %s", r.State())
		}
	}
	rate := float64(falseAlarms) / runs
	t.Logf("ramps with 2x heavier treatment users and equal error rates: %.1f%% rolled back (%d runs)", 100*rate, runs)
	if tol := binomialTolerance(DefaultAlpha, runs); rate > DefaultAlpha+tol {
		t.Errorf("false rollbacks %.4f exceed alpha %v + %.4f", rate, DefaultAlpha, tol)
	}
}

func latencyConfig() Config {
	return Config{
		Steps:        []float64{50, 100},
		StepDuration: time.Hour,
		Guardrails:   []GuardrailConfig{{Kind: KindLatency, Quantile: 0.99, Delta: 250 * time.Millisecond}},
	}
}

func TestLatencyThresholdFreezes(t *testing.T) {
	r := newTestRamp(t, latencyConfig(), t0)
	// Before control has 200 samples nothing is judged, however slow.
	feed(r, Treatment, 500, false, 10*time.Second)
	for i := 1; i < DefaultMinControl; i++ {
		r.Observe(Control, false, time.Duration(i)*time.Millisecond)
	}
	wantNoEvent(t, r.Tick(t0.Add(time.Second)))
	g := r.Status().Guardrails[0]
	if g.LatencyThresholdMS != nil || g.ControlSamples != DefaultMinControl-1 || g.TreatmentEvents != 0 {
		t.Fatalf("before %d control samples: %+v", DefaultMinControl, g)
	}

	r.Observe(Control, false, DefaultMinControl*time.Millisecond)
	wantNoEvent(t, r.Tick(t0.Add(2*time.Second)))
	g = r.Status().Guardrails[0]
	if g.LatencyThresholdMS == nil {
		t.Fatalf("threshold not frozen after %d control samples: %+v", DefaultMinControl, g)
	}
	// Control latencies 1..200 ms: p99 is 198 ms, so the threshold is 448 ms,
	// give or take a histogram bucket.
	if th := *g.LatencyThresholdMS; math.Abs(th-448) > 198.0/histSub {
		t.Errorf("frozen threshold %.1f ms, want 448 ms ± %.1f", th, 198.0/histSub)
	}
	frozen := *g.LatencyThresholdMS

	// Later control latencies neither move the threshold nor feed the histogram.
	feed(r, Control, 20, false, 5*time.Second)
	feed(r, Control, 80, false, 10*time.Millisecond)
	feed(r, Treatment, 100, false, 10*time.Millisecond)
	wantNoEvent(t, r.Tick(t0.Add(3*time.Second)))
	g = r.Status().Guardrails[0]
	if *g.LatencyThresholdMS != frozen || g.ControlSamples != DefaultMinControl {
		t.Errorf("after more control traffic: threshold %v ms (was %v), %d control samples", *g.LatencyThresholdMS, frozen, g.ControlSamples)
	}
	if g.EValue >= 1 {
		t.Errorf("e-value %v after 20 slow control and no slow treatment requests, want < 1", g.EValue)
	}

	// Now slow treatment requests count, and breach.
	feed(r, Control, 200, false, 100*time.Millisecond)
	feed(r, Treatment, 200, false, time.Second)
	ev := r.Tick(t0.Add(4 * time.Second))
	wantEvent(t, ev, EventRolledBack, 50, 0)
	if ev.Guardrail != "latency p99 +250ms" {
		t.Errorf("breached guardrail %q, want %q", ev.Guardrail, "latency p99 +250ms")
	}
}

// latencyRun runs a ramp held at 50 % whose latencies are lognormal (median
// 100 ms, σ 1 in log space; p99 ≈ 1 s) with treatment's shifted by shift, and
// returns the requests before a rollback, or -1 if none within maxRequests.
func latencyRun(t *testing.T, rng *rand.Rand, shift time.Duration, maxRequests int) int {
	r := newTestRamp(t, latencyConfig(), t0)
	now := t0
	for n := batch; n <= maxRequests; n += batch {
		for range batch {
			arm, extra := Control, time.Duration(0)
			if rng.Float64() < 0.5 {
				arm, extra = Treatment, shift
			}
			r.Observe(arm, false, lognormal(rng, 100*time.Millisecond, 1)+extra)
		}
		now = now.Add(time.Second)
		if r.Tick(now).Kind == EventRolledBack {
			return n
		}
	}
	return -1
}

func TestLatencyGuardrailFalseAlarmsAndPower(t *testing.T) {
	t.Parallel()
	const nullRuns, shiftedRuns = 500, 300
	rng := newRNG(60)
	nullRate, _ := alarmRate(nullRuns, func() int { return latencyRun(t, rng, 0, 10_000) })
	delta := latencyConfig().Guardrails[0].Delta
	shiftedRate, hits := alarmRate(shiftedRuns, func() int { return latencyRun(t, rng, 2*delta, 20_000) })
	t.Logf("latency p99 +250ms at 50%%: identical latencies rolled back in %.1f%% of %d runs of 10,000 requests; +500ms detected within 20,000 requests in %.1f%% of %d runs",
		100*nullRate, nullRuns, 100*shiftedRate, shiftedRuns)
	if len(hits) > 0 {
		t.Logf("+500ms: requests to detection: median %d, 90th percentile %d (threshold frozen after ~%d requests)",
			hits[len(hits)/2], hits[len(hits)*9/10], 2*DefaultMinControl)
	}
	if tol := binomialTolerance(DefaultAlpha, nullRuns); nullRate > DefaultAlpha+tol {
		t.Errorf("false alarm rate %.4f exceeds alpha %v + %.4f", nullRate, DefaultAlpha, tol)
	}
	if shiftedRate < 0.95 {
		t.Errorf("a +2×delta shift was detected in only %.4f of runs", shiftedRate)
	}
}

func TestObserveIgnoresUnknownArm(t *testing.T) {
	r := newTestRamp(t, errorRateConfig(Rollback), t0)
	r.Observe(Arm(7), true, time.Second)
	if st := r.Status(); st.Total != (Counts{}) {
		t.Errorf("unknown arm counted: %+v", st.Total)
	}
}

func TestObserveDoesNotAllocate(t *testing.T) {
	cfg := errorRateConfig(Rollback)
	cfg.Guardrails = append(cfg.Guardrails, GuardrailConfig{Kind: KindLatency, Quantile: 0.99, Delta: 250 * time.Millisecond})
	r := newTestRamp(t, cfg, t0)
	if n := testing.AllocsPerRun(1000, func() { r.Observe(Control, false, 20*time.Millisecond) }); n != 0 {
		t.Errorf("Observe before the latency threshold froze: %v allocations", n)
	}
	r.Tick(t0)
	if r.Status().Guardrails[1].LatencyThresholdMS == nil {
		t.Fatal("threshold not frozen")
	}
	if n := testing.AllocsPerRun(1000, func() { r.Observe(Treatment, true, 20*time.Millisecond) }); n != 0 {
		t.Errorf("Observe after the latency threshold froze: %v allocations", n)
	}
}

// TestRampConcurrentUse runs Observe from several goroutines while another
// ticks, reads status and operates the ramp; run it under -race.
func TestRampConcurrentUse(t *testing.T) {
	cfg := Config{
		Steps:       []float64{5, 25, 50, 100},
		MinRequests: 2000,
		Guardrails: []GuardrailConfig{
			{Kind: KindErrorRate, Factor: 2},
			{Kind: KindLatency, Quantile: 0.99, Delta: 250 * time.Millisecond},
		},
	}
	r := newTestRamp(t, cfg, t0)
	const workers, perWorker = 4, 20_000
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			rng := newRNG(uint64(100 + w))
			for range perWorker {
				arm := Control
				if rng.Float64()*100 < r.Percentage() {
					arm = Treatment
				}
				r.Observe(arm, rng.Float64() < 0.01, time.Duration(rng.IntN(200))*time.Millisecond)
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	now := t0
	events := 0
	for running := true; running; {
		select {
		case <-done:
			running = false
		default:
		}
		now = now.Add(time.Second)
		if r.Tick(now).Kind != "" {
			events++
		}
		if _, err := json.Marshal(r.Status()); err != nil {
			t.Fatal(err)
		}
		_ = r.Progress()
		_ = r.Cap().Killed
		if err := r.Pause(now); err == nil {
			if err := r.Resume(now); err != nil {
				t.Fatal(err)
			}
		}
	}
	r.Tick(now.Add(time.Second))
	st := r.Status()
	got := st.Total.Control.Requests + st.Total.Treatment.Requests
	if got != workers*perWorker {
		t.Errorf("total requests %d, want %d", got, workers*perWorker)
	}
	if st.Total.Control.Errors > st.Total.Control.Requests || st.Total.Treatment.Errors > st.Total.Treatment.Requests {
		t.Errorf("more errors than requests: %+v", st.Total)
	}
	if events == 0 || st.State == RolledBack {
		t.Errorf("healthy concurrent ramp: %d transitions, final state %s", events, st.State)
	}
	t.Logf("final state %s at %v%% after %d transitions", st.State, st.Percentage, events)
}

func BenchmarkObserve(b *testing.B) {
	cfg := errorRateConfig(Rollback)
	cfg.Guardrails = append(cfg.Guardrails, GuardrailConfig{Kind: KindLatency, Quantile: 0.99, Delta: 250 * time.Millisecond})
	r := newTestRamp(b, cfg, t0)
	feed(r, Control, DefaultMinControl, false, 50*time.Millisecond)
	r.Tick(t0) // freeze the latency threshold: the steady-state path
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			r.Observe(Arm(i&1), i&63 == 0, time.Duration(i&1023)*time.Millisecond)
			i++
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				r.Observe(Arm(i&1), i&63 == 0, time.Duration(i&1023)*time.Millisecond)
				i++
			}
		})
	})
}

package rollout

import (
	"encoding/json"
	"math"
	"testing"
	"time"
)

func TestNewTestRejectsBadParameters(t *testing.T) {
	for _, c := range []struct{ factor, alpha float64 }{
		{0.5, 0.05}, {0, 0.05}, {-1, 0.05}, {math.NaN(), 0.05}, {math.Inf(1), 0.05},
		{2, 0}, {2, 1}, {2, -0.1}, {2, math.NaN()},
	} {
		if _, err := NewTest(c.factor, c.alpha); err == nil {
			t.Errorf("NewTest(%v, %v): no error", c.factor, c.alpha)
		}
	}
	if _, err := NewTest(1, 0.05); err != nil {
		t.Errorf("NewTest(1, 0.05): %v", err)
	}
}

func TestEValueMatchesDirectComputation(t *testing.T) {
	const factor, share = 2.0, 0.3
	test, err := NewTest(factor, 0.05)
	if err != nil {
		t.Fatal(err)
	}
	if e := test.EValue(); e != 1 {
		t.Fatalf("e-value before any event = %v, want 1", e)
	}
	test.Fold(share, 2, 1)

	p := func(r float64) float64 { return r * share / (r*share + 1 - share) }
	p0 := p(factor)
	var want float64
	for _, m := range []float64{1.25, 1.5, 2, 3, 5, 10} {
		pr := p(factor * m)
		want += (pr / p0) * (pr / p0) * ((1 - pr) / (1 - p0)) / 6
	}
	if got := test.EValue(); math.Abs(got-want) > 1e-12*want {
		t.Errorf("e-value = %.15g, want %.15g", got, want)
	}
	if tr, co := test.Events(); tr != 2 || co != 1 {
		t.Errorf("Events() = %d, %d; want 2, 1", tr, co)
	}
}

func TestFoldBatchEqualsEventByEvent(t *testing.T) {
	batch, _ := NewTest(1.5, 0.05)
	single, _ := NewTest(1.5, 0.05)
	batch.Fold(0.05, 7, 40)
	for range 7 {
		single.Fold(0.05, 1, 0)
	}
	for range 40 {
		single.Fold(0.05, 0, 1)
	}
	if b, s := batch.EValue(), single.EValue(); math.Abs(b-s) > 1e-9*s {
		t.Errorf("batch e-value %.15g, event by event %.15g", b, s)
	}
}

func TestFoldIgnoresUninformativeShares(t *testing.T) {
	test, _ := NewTest(2, 0.05)
	for _, s := range []float64{0, 1, -0.5, 1.5, math.NaN()} {
		test.Fold(s, 1000, 0)
	}
	if e := test.EValue(); e != 1 || test.Breached() {
		t.Errorf("after folding at uninformative shares: e-value %v, breached %v; want 1, false", e, test.Breached())
	}
	if tr, co := test.Events(); tr != 0 || co != 0 {
		t.Errorf("Events() = %d, %d; want 0, 0", tr, co)
	}
}

func TestEValueDirection(t *testing.T) {
	// Errors concentrated on treatment raise the e-value; errors on control
	// lower it; a breach sticks once reached.
	test, _ := NewTest(2, 0.05)
	test.Fold(0.5, 0, 50)
	if e := test.EValue(); e >= 1 {
		t.Errorf("e-value after 50 control errors = %v, want < 1", e)
	}
	test2, _ := NewTest(2, 0.05)
	test2.Fold(0.5, 40, 2)
	if !test2.Breached() || test2.EValue() < test2.Threshold() {
		t.Fatalf("40 treatment vs 2 control errors at equal shares: e-value %v, breached %v", test2.EValue(), test2.Breached())
	}
	test2.Fold(0.5, 0, 500)
	if test2.EValue() >= test2.Threshold() || !test2.Breached() {
		t.Errorf("after 500 more control errors: e-value %v (want below threshold), breached %v (want true)", test2.EValue(), test2.Breached())
	}
}

func TestEValueSaturates(t *testing.T) {
	test, _ := NewTest(1, 0.05)
	test.Fold(0.01, 1_000_000, 0)
	e := test.EValue()
	if e != math.MaxFloat64 {
		t.Errorf("e-value after a million one-sided events = %v, want math.MaxFloat64", e)
	}
	if _, err := json.Marshal(e); err != nil {
		t.Errorf("saturated e-value does not marshal: %v", err)
	}
}

// TestTypeIError checks that, at the boundary of the null (treatment's error
// rate exactly F times control's), the probability that the e-value ever
// reaches 1/alpha over a whole ramp stays within alpha, and that it is lower
// still when treatment is in fact as good as control.
func TestTypeIError(t *testing.T) {
	t.Parallel()
	const runs = 2000
	tol := binomialTolerance(DefaultAlpha, runs)
	for _, factor := range []float64{1, 2} {
		rng := newRNG(uint64(10 + factor))
		boundary, _ := alarmRate(runs, func() int { return nominalRun(rng, factor, factor, 0.01) })
		// Half the tolerated ratio: equal error rates for the 2x guardrail.
		below, _ := alarmRate(runs, func() int { return nominalRun(rng, factor, factor/2, 0.01) })
		t.Logf("factor %v: false alarms %.2f%% at ratio %v (null boundary), %.2f%% at ratio %v (%d runs of %d requests)",
			factor, 100*boundary, factor, 100*below, factor/2, runs, len(rampSchedule)*stepRequests)
		if boundary > DefaultAlpha+tol {
			t.Errorf("factor %v: false alarm rate at the null boundary %.4f exceeds alpha %v + %.4f", factor, boundary, DefaultAlpha, tol)
		}
		if below > boundary {
			t.Errorf("factor %v: false alarm rate below the boundary %.4f exceeds the boundary's %.4f", factor, below, boundary)
		}
	}
}

// TestTypeIErrorSkewedShare covers a treatment whose users send more than
// their share of the requests (flags bucket users, not requests): with equal
// error rates, folding at the realized request share keeps false alarms
// within alpha, whereas folding at the nominal percentage mistakes the skew
// for a regression, which is why the Ramp folds at the realized share.
func TestTypeIErrorSkewedShare(t *testing.T) {
	t.Parallel()
	const runs = 1000
	tol := binomialTolerance(DefaultAlpha, runs)
	// Treatment users send twice as many requests as control users.
	heavy := func(s float64) float64 { return 2 * s / (1 + s) }
	rng := newRNG(20)
	realized, _ := alarmRate(runs, func() int { return skewedRun(rng, 1, 1, 0.01, heavy, true) })
	nominal, _ := alarmRate(runs, func() int { return skewedRun(rng, 1, 1, 0.01, heavy, false) })
	boundary, _ := alarmRate(runs, func() int { return skewedRun(rng, 2, 2, 0.01, heavy, true) })
	t.Logf("treatment users twice as heavy, equal error rates, factor 1: false alarms %.1f%% at the realized share, %.1f%% at the nominal share",
		100*realized, 100*nominal)
	t.Logf("same skew, factor 2 at its boundary: false alarms %.1f%% at the realized share", 100*boundary)
	if realized > DefaultAlpha+tol || boundary > DefaultAlpha+tol {
		t.Errorf("realized share: false alarm rates %.4f, %.4f exceed alpha %v + %.4f", realized, boundary, DefaultAlpha, tol)
	}
	if nominal < 0.5 {
		t.Errorf("nominal share under a 2x request skew: false alarm rate %.4f, expected the skew to be mistaken for a regression", nominal)
	}
}

// TestTypeIErrorHighBaseRate checks calibration when errors are common
// (control 20 %, treatment 40 %, factor 2), where the rare-event (Poisson)
// picture behind the test is at its roughest.
func TestTypeIErrorHighBaseRate(t *testing.T) {
	t.Parallel()
	const runs = 1000
	tol := binomialTolerance(DefaultAlpha, runs)
	rng := newRNG(30)
	same := func(s float64) float64 { return s }
	realized, _ := alarmRate(runs, func() int { return skewedRun(rng, 2, 2, 0.2, same, true) })
	nominal, _ := alarmRate(runs, func() int { return nominalRun(rng, 2, 2, 0.2) })
	t.Logf("control 20%% errors, treatment 40%%, factor 2: false alarms %.1f%% (realized share), %.1f%% (nominal share)", 100*realized, 100*nominal)
	if realized > DefaultAlpha+tol || nominal > DefaultAlpha+tol {
		t.Errorf("false alarm rates %.4f (realized), %.4f (nominal) exceed alpha %v + %.4f", realized, nominal, DefaultAlpha, tol)
	}
}

// TestPower checks that a treatment failing 5 times as often as control is
// caught by a "2x" guardrail early in the ramp.
func TestPower(t *testing.T) {
	t.Parallel()
	const runs = 1000
	rng := newRNG(40)
	rate, hits := alarmRate(runs, func() int { return nominalRun(rng, 2, 5, 0.01) })
	if len(hits) == 0 {
		t.Fatal("never detected")
	}
	median, p90 := hits[len(hits)/2], hits[len(hits)*9/10]
	t.Logf("error rate 5%% vs 1%%, factor 2: detected in %.1f%% of runs; requests to detection: median %d, 90th percentile %d (of detected runs)",
		100*rate, median, p90)
	if rate < 0.99 {
		t.Errorf("detected in %.4f of runs, want at least 0.99", rate)
	}
	if median > 6000 {
		t.Errorf("median requests to detection %d, want at most 6000", median)
	}

	rng = newRNG(41)
	rate, hits = alarmRate(runs, func() int { return nominalRun(rng, 2, 3, 0.01) })
	if len(hits) > 0 {
		t.Logf("error rate 3%% vs 1%%, factor 2: detected in %.1f%% of runs; median requests to detection %d", 100*rate, hits[len(hits)/2])
	}
	if rate < 0.4 {
		t.Errorf("ratio 3 against factor 2: detected in %.4f of runs, want at least 0.4", rate)
	}
}

func TestHistogramBuckets(t *testing.T) {
	// Every bucket's bounds contain the values mapped to it, and buckets tile
	// the range without gaps.
	prevHi := int64(0)
	for i := range histBuckets - 1 {
		lo, hi := histBounds(i)
		if lo != prevHi {
			t.Fatalf("bucket %d starts at %d, previous ended at %d", i, lo, prevHi)
		}
		if i > 0 && float64(hi-lo) > float64(lo)/histSub+1 {
			t.Errorf("bucket %d [%d, %d) wider than 1/%d of its lower bound", i, lo, hi, histSub)
		}
		for _, v := range []int64{lo, (lo + hi) / 2, hi - 1} {
			if got := histIndex(v); got != i {
				t.Fatalf("histIndex(%d) = %d, want %d (bucket [%d, %d))", v, got, i, lo, hi)
			}
		}
		prevHi = hi
	}
	if prevHi != histMaxNanos {
		t.Errorf("buckets end at %d, want %d", prevHi, histMaxNanos)
	}
	if got := histIndex(int64(time.Hour)); got != histBuckets-1 {
		t.Errorf("histIndex(1h) = %d, want the overflow bucket", got)
	}
}

func TestHistogramQuantile(t *testing.T) {
	var h LatencyHistogram
	if q := h.Quantile(0.5); q != 0 {
		t.Errorf("empty histogram quantile = %v, want 0", q)
	}
	// 1 ms, 2 ms, ..., 1000 ms.
	for i := 1; i <= 1000; i++ {
		h.Record(time.Duration(i) * time.Millisecond)
	}
	if n := h.Count(); n != 1000 {
		t.Fatalf("Count() = %d, want 1000", n)
	}
	for _, q := range []float64{0.01, 0.5, 0.9, 0.99, 1} {
		want := q * 1000 * float64(time.Millisecond)
		got := float64(h.Quantile(q))
		if math.Abs(got-want) > want/histSub {
			t.Errorf("Quantile(%v) = %v, want %v within %.1f%%", q, time.Duration(got), time.Duration(want), 100.0/histSub)
		}
	}
	h.Record(2 * time.Minute)
	if got := h.Quantile(1); got != 60*time.Second {
		t.Errorf("max with an overflowing latency = %v, want 60s", got)
	}
	h.Reset()
	if n := h.Count(); n != 0 {
		t.Errorf("Count() after Reset = %d", n)
	}
	h.Record(10 * time.Microsecond)
	if got := h.Quantile(0.5); got < 0 || got > 100*time.Microsecond {
		t.Errorf("median of one 10µs latency = %v, want within the underflow bucket", got)
	}
}

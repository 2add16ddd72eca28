package rollout

import (
	"fmt"
	"math"
	"math/bits"
	"sync/atomic"
	"time"
)

// Arm is the side of a flag that served a request.
type Arm uint8

const (
	// Control is the side users stay on until the rollout reaches them.
	Control Arm = iota
	// Treatment is the side being rolled out.
	Treatment
)

// String returns "control" or "treatment".
func (a Arm) String() string {
	switch a {
	case Control:
		return "control"
	case Treatment:
		return "treatment"
	}
	return fmt.Sprintf("Arm(%d)", uint8(a))
}

// mixture is the grid of alternatives, as multiples m of the null factor F:
// the test bets on "treatment's event rate is F·m times control's" for each m,
// with equal weights. A grid rather than a single alternative keeps the test
// sensitive both to gross regressions (found in a handful of events by the
// large ratios) and to moderate ones (found eventually by the small ratios),
// at the price of a log(6) handicap. The smallest multiple, 1.25, bounds how
// subtle a regression the test is tuned for; anything beyond F is still
// detected, just more slowly when it is close to F.
var mixture = [...]float64{1.25, 1.5, 2, 3, 5, 10}

// logMixture holds log(m) for each multiple, and logWeight the log of the
// common weight 1/len(mixture).
var (
	logMixture [len(mixture)]float64
	logWeight  = -math.Log(float64(len(mixture)))
)

func init() {
	for k, m := range mixture {
		logMixture[k] = math.Log(m)
	}
}

// Test is a one-sided mixture sequential probability ratio test of the null
// hypothesis "treatment's event rate is at most Factor times control's"
// (Lindon & Malek, "Anytime-Valid Inference for Multinomial Count Data",
// arXiv:2011.03567, specialised to two arms).
//
// Conditional on an event happening while treatment carries a share s of the
// traffic (0 < s < 1), and the arms' event rates being in ratio ρ = λT/λC, the
// event came from treatment with probability
//
//	p_ρ(s) = ρ·s / (ρ·s + (1−s)).
//
// The null sits at ρ = F; each alternative on the grid at r_k = F·m_k. Every
// event from arm a multiplies the likelihood ratio M_k by P_{r_k}(a)/P_F(a),
// and the e-value is the mixture E = Σ_k M_k / K. Write p0 = P_F(T) and
// pr = P_{r_k}(T) > p0. If the true probability that an event came from
// treatment is q, the expected factor by which one event multiplies M_k is
// q·pr/p0 + (1−q)(1−pr)/(1−p0): increasing in q, and exactly 1 at q = p0.
// Whenever the true ratio is at most F, q ≤ p0, so every M_k, hence E, is a
// nonnegative supermartingale under the whole one-sided null, and Ville's
// inequality bounds the probability that E ever reaches 1/α by α: however
// often it is looked at, and however the share changes over time.
//
// The share a batch is weighed with must not depend on which arm its events
// came from. It may be the nominal rollout share (arms drawn per request), or
// the realized share of requests over the span the events come from: the test
// is then conditional on the requests each arm received, which play the part
// of the exposures in Lindon & Malek's Poisson model. That model is exact for
// Poisson counts and close for rare events; with common events (the tests try
// 20 % against 40 %) per-request counts are less dispersed than Poisson ones,
// and the test errs on the conservative side.
//
// Computations run in log space because M_k overflows a float64 after a few
// hundred lopsided events. A Test is not safe for concurrent use.
type Test struct {
	factor   float64
	alpha    float64
	logBound float64 // log(1/alpha)
	logM     [len(mixture)]float64
	// treatment and control count the events folded in so far.
	treatment, control uint64
	breached           bool
}

// MaxFactor bounds a guardrail's factor. Beyond it the test's arithmetic
// would overflow, and no guardrail that lenient is meaningful.
const MaxFactor = 1e6

// NewTest returns a test of "treatment's event rate ≤ factor × control's" at
// level alpha. The factor must be at least 1 (a guardrail that tolerates no
// difference uses 1) and alpha must lie in (0, 1).
func NewTest(factor, alpha float64) (*Test, error) {
	if !(factor >= 1 && factor <= MaxFactor) {
		return nil, fmt.Errorf("rollout: test factor %v: must be in [1, %g]", factor, float64(MaxFactor))
	}
	if !(alpha > 0 && alpha < 1) {
		return nil, fmt.Errorf("rollout: test alpha %v: must be in (0, 1)", alpha)
	}
	return newTest(factor, alpha), nil
}

// newTest is NewTest for parameters already validated.
func newTest(factor, alpha float64) *Test {
	return &Test{factor: factor, alpha: alpha, logBound: -math.Log(alpha)}
}

// Fold adds treatmentEvents events from treatment and controlEvents events
// from control, all of which happened while treatment carried the given share
// of the traffic. Folding a batch is exactly equivalent to folding its events
// one by one, since the per-event factors are the same within a batch.
//
// A share of 0 or 1 (or outside that range, or NaN) leaves the test unchanged:
// with only one arm exposed, the origin of an event says nothing about the
// ratio of rates.
func (t *Test) Fold(treatmentShare float64, treatmentEvents, controlEvents uint64) {
	s := treatmentShare
	if !(s > 0 && s < 1) || treatmentEvents == 0 && controlEvents == 0 {
		return
	}
	nt, nc := float64(treatmentEvents), float64(controlEvents)
	// The normaliser ρ·s + (1−s) is written 1 + s(ρ−1) so that log1p keeps
	// full precision at the small shares of the first steps.
	logNull := math.Log1p(s * (t.factor - 1))
	for k := range mixture {
		logAlt := math.Log1p(s * (t.factor*mixture[k] - 1))
		// P_r(C)/P_F(C) = (F·s + 1−s) / (r·s + 1−s), and
		// P_r(T)/P_F(T) = m · (F·s + 1−s) / (r·s + 1−s) with r = F·m.
		logC := logNull - logAlt
		logT := logMixture[k] + logC
		t.logM[k] += nt*logT + nc*logC
	}
	t.treatment += treatmentEvents
	t.control += controlEvents
	if t.logEValue() >= t.logBound {
		t.breached = true
	}
}

// logEValue is log(Σ_k w·M_k), computed by log-sum-exp.
func (t *Test) logEValue() float64 { return logSumExp(t.logM[:]) + logWeight }

// logSumExp is log(Σ exp(l)), shifted by the largest term so that no term
// overflows or underflows on its own.
func logSumExp(ls []float64) float64 {
	hi := math.Inf(-1)
	for _, l := range ls {
		hi = max(hi, l)
	}
	var sum float64
	for _, l := range ls {
		sum += math.Exp(l - hi)
	}
	return hi + math.Log(sum)
}

// EValue returns the current e-value: 1 before any event, growing as the
// evidence against the null accumulates, shrinking towards 0 while treatment
// behaves. It saturates at math.MaxFloat64 rather than overflowing, so it
// always marshals to JSON.
func (t *Test) EValue() float64 {
	return min(math.Exp(t.logEValue()), math.MaxFloat64)
}

// Threshold returns 1/alpha, the e-value at which the test is breached.
func (t *Test) Threshold() float64 { return 1 / t.alpha }

// Breached reports whether the e-value has reached 1/alpha after some fold.
// It stays true once set: Ville's inequality bounds the probability of ever
// crossing, so a crossing is a finding even if later data pull the e-value
// back down.
func (t *Test) Breached() bool { return t.breached }

// Events returns how many events from each arm have been folded in (events
// folded at a share of 0 or 1 are not counted, since they were ignored).
func (t *Test) Events() (treatment, control uint64) { return t.treatment, t.control }

// Latency histogram layout: log-linear buckets in the manner of HDR
// histograms. Each power of two is cut into 16 equal sub-buckets, so every
// bucket spans at most 1/16 (6.25 %) of its lower bound, and a bucket index is
// a few shifts rather than a logarithm. The sub-buckets run from the one
// holding 100 µs (in the octave 2^16 ns) to the one holding 60 s (in the
// octave 2^35 ns); index 0 holds everything below 100 µs, the last index
// everything from 60 s up.
const (
	histSubBits  = 4
	histSub      = 1 << histSubBits
	histMinNanos = int64(100 * time.Microsecond)
	histMaxNanos = int64(60 * time.Second)
	histMinExp   = 16 // floor(log2(histMinNanos))
	histMaxExp   = 35 // floor(log2(histMaxNanos))
	// histFirst and histLast are the log-linear positions (octave·16 + sub,
	// counted from octave histMinExp) of histMinNanos and histMaxNanos−1.
	histFirst   = int(histMinNanos>>(histMinExp-histSubBits)) - histSub
	histLast    = (histMaxExp-histMinExp)*histSub + int((histMaxNanos-1)>>(histMaxExp-histSubBits)) - histSub
	histBuckets = histLast - histFirst + 1 + 2
)

// LatencyHistogram records latencies in fixed log-scaled buckets (100 µs to
// 60 s, under 6.25 % relative width) with atomic counters, so that any number
// of goroutines can record without locks while another estimates quantiles.
// The zero value is ready to use; a LatencyHistogram must not be copied after
// first use.
type LatencyHistogram struct {
	buckets [histBuckets]atomic.Uint64
}

func histIndex(ns int64) int {
	switch {
	case ns < histMinNanos:
		return 0
	case ns >= histMaxNanos:
		return histBuckets - 1
	}
	u := uint64(ns)
	e := bits.Len64(u) - 1
	sub := int(u>>(e-histSubBits)) & (histSub - 1)
	return 1 + (e-histMinExp)*histSub + sub - histFirst
}

// histBounds returns the half-open range [lo, hi) of bucket i, in nanoseconds.
func histBounds(i int) (lo, hi int64) {
	switch i {
	case 0:
		return 0, histMinNanos
	case histBuckets - 1:
		return histMaxNanos, histMaxNanos
	}
	pos := i - 1 + histFirst
	e := histMinExp + pos/histSub
	sub := int64(pos % histSub)
	lo = (histSub + sub) << (e - histSubBits)
	hi = (histSub + sub + 1) << (e - histSubBits)
	return max(lo, histMinNanos), min(hi, histMaxNanos)
}

// Record adds one latency.
func (h *LatencyHistogram) Record(d time.Duration) {
	h.buckets[histIndex(int64(d))].Add(1)
}

// Count returns the number of latencies recorded.
func (h *LatencyHistogram) Count() uint64 {
	var n uint64
	for i := range h.buckets {
		n += h.buckets[i].Load()
	}
	return n
}

// Reset forgets every recorded latency. Records racing with Reset may survive it.
func (h *LatencyHistogram) Reset() {
	for i := range h.buckets {
		h.buckets[i].Store(0)
	}
}

// Quantile estimates the q-quantile (0 ≤ q ≤ 1) of the recorded latencies,
// interpolating linearly within the bucket that holds it; 0 when empty.
// Latencies of 60 s or more count as exactly 60 s. Records racing with
// Quantile may or may not be seen.
func (h *LatencyHistogram) Quantile(q float64) time.Duration {
	var counts [histBuckets]uint64
	var total uint64
	for i := range h.buckets {
		counts[i] = h.buckets[i].Load()
		total += counts[i]
	}
	if total == 0 {
		return 0
	}
	q = min(max(q, 0), 1)
	rank := q * float64(total)
	var cum float64
	last := 0
	for i, c := range counts {
		if c == 0 {
			continue
		}
		last = i
		if cum+float64(c) >= rank {
			lo, hi := histBounds(i)
			frac := (rank - cum) / float64(c)
			return time.Duration(float64(lo) + frac*float64(hi-lo))
		}
		cum += float64(c)
	}
	_, hi := histBounds(last)
	return time.Duration(hi)
}

// armSlow holds one arm's latency counters, padded to a cache line so that
// the arms' counters do not contend with each other.
type armSlow struct {
	requests atomic.Uint64 // requests compared with the threshold
	slow     atomic.Uint64 // those slower than it
	_        [48]byte
}

// latencyGuard turns latencies into "slow" events for a Test. Until control
// has minControl samples it only records control latencies; then Tick freezes
// the threshold at control's quantile plus delta, and from there on each
// request is compared with it. The threshold is estimated only from requests
// that come before every request it judges, so under the null the slow events
// of both arms are judged by the same fixed yardstick and the Test stays valid
// whatever value the estimate happens to take.
type latencyGuard struct {
	quantile   float64
	delta      time.Duration
	minControl uint64

	// threshold is the frozen threshold in nanoseconds, or -1 while unfrozen.
	threshold atomic.Int64
	hist      LatencyHistogram
	arms      [2]armSlow

	// seen holds the counters already folded (or discarded), guarded by the
	// Ramp's mutex.
	seenRequests, seenSlow [2]uint64
}

func newLatencyGuard(quantile float64, delta time.Duration, minControl uint64) *latencyGuard {
	g := &latencyGuard{quantile: quantile, delta: delta, minControl: minControl}
	g.threshold.Store(-1)
	return g
}

// observe is the hot path: atomics only.
func (g *latencyGuard) observe(arm Arm, latency time.Duration) {
	th := g.threshold.Load()
	if th < 0 {
		if arm == Control {
			g.hist.Record(latency)
		}
		return
	}
	a := &g.arms[arm]
	// Count the request before its slow event, mirroring the error counters.
	a.requests.Add(1)
	if int64(latency) > th {
		a.slow.Add(1)
	}
}

// frozen returns the threshold and whether it has been frozen yet.
func (g *latencyGuard) frozen() (time.Duration, bool) {
	th := g.threshold.Load()
	return time.Duration(th), th >= 0
}

// fold freezes the threshold once control has enough samples, and afterwards
// folds the slow events since the last fold into t.
func (g *latencyGuard) fold(t *Test) {
	if _, ok := g.frozen(); !ok {
		if g.hist.Count() >= g.minControl {
			g.threshold.Store(int64(g.hist.Quantile(g.quantile) + g.delta))
			g.skip()
		}
		return
	}
	var slow, reqs [2]uint64
	for a := range g.arms {
		slow[a] = g.arms[a].slow.Load()
	}
	for a := range g.arms {
		reqs[a] = g.arms[a].requests.Load()
	}
	foldCounts(t, reqs, slow, &g.seenRequests, &g.seenSlow)
}

// skip marks everything counted so far as seen, so that it is never folded.
func (g *latencyGuard) skip() {
	for a := range g.arms {
		g.seenSlow[a] = g.arms[a].slow.Load()
		g.seenRequests[a] = g.arms[a].requests.Load()
	}
}

// foldCounts folds the events counted since seen into t, weighing them by the
// treatment share of the requests counted over the same span, and advances
// seen. While only one arm has had requests since the last fold, it keeps the
// counts pending instead: folding them would waste them (a share of 0 or 1
// carries no information), whereas pooled with the next span they still count.
// Pooling is sound because, with constant per-arm rates, events over a pooled
// span are split between the arms in proportion to the pooled exposure.
func foldCounts(t *Test, reqs, events [2]uint64, seenReqs, seenEvents *[2]uint64) {
	dt := reqs[Treatment] - seenReqs[Treatment]
	dc := reqs[Control] - seenReqs[Control]
	if dt == 0 || dc == 0 {
		return
	}
	share := float64(dt) / float64(dt+dc)
	t.Fold(share, events[Treatment]-seenEvents[Treatment], events[Control]-seenEvents[Control])
	*seenReqs, *seenEvents = reqs, events
}

package rollout

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// newRNG returns a deterministic generator, so that every simulation in the
// tests gives the same numbers on every run.
func newRNG(seed uint64) *rand.Rand {
	return rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
}

// binomial draws from Binomial(n, p) by jumping over geometric runs of
// failures, which costs O(n·min(p, 1−p)) rather than O(n).
func binomial(rng *rand.Rand, n uint64, p float64) uint64 {
	switch {
	case n == 0 || p <= 0:
		return 0
	case p >= 1:
		return n
	case p > 0.5:
		return n - binomial(rng, n, 1-p)
	}
	logq := math.Log1p(-p)
	var k, pos uint64
	for {
		// Failures before the next success: floor(log U / log(1−p)), U in (0, 1].
		g := math.Log(1-rng.Float64()) / logq
		if g >= float64(n-pos) {
			return k
		}
		pos += uint64(g) + 1
		k++
	}
}

func TestBinomialSampler(t *testing.T) {
	rng := newRNG(1)
	for _, c := range []struct {
		n uint64
		p float64
	}{{100, 0.01}, {100, 0.3}, {1000, 0.05}, {50, 0.9}} {
		const draws = 20000
		var sum, sumSq float64
		for range draws {
			x := float64(binomial(rng, c.n, c.p))
			sum += x
			sumSq += x * x
		}
		mean := sum / draws
		variance := sumSq/draws - mean*mean
		wantMean := float64(c.n) * c.p
		wantVar := wantMean * (1 - c.p)
		if math.Abs(mean-wantMean) > 5*math.Sqrt(wantVar/draws) {
			t.Errorf("Binomial(%d, %v): mean %.4f, want %.4f", c.n, c.p, mean, wantMean)
		}
		if math.Abs(variance-wantVar) > 0.05*wantVar {
			t.Errorf("Binomial(%d, %v): variance %.4f, want %.4f", c.n, c.p, variance, wantVar)
		}
	}
}

// rampSchedule is the share schedule of the simulated ramps: 5, 25, 50 and
// 100 %, stepsRequests requests each, arriving in batches of batch requests
// (one batch per simulated second).
var rampSchedule = []float64{0.05, 0.25, 0.50, 1}

const (
	stepRequests = 5000
	batch        = 100
)

// nominalRun simulates one ramp of requests whose arm is drawn with the
// nominal share s and which fail with probability pC (control) or ratio·pC
// (treatment), folding each batch at the nominal share. It returns the number
// of requests before the test was breached, or -1 if it never was.
func nominalRun(rng *rand.Rand, factor, ratio, pC float64) int {
	test, err := NewTest(factor, DefaultAlpha)
	if err != nil {
		panic(err)
	}
	pT := ratio * pC
	n := 0
	for _, s := range rampSchedule {
		for range stepRequests / batch {
			// (treatment errors, control errors, rest) is multinomial over the
			// batch's requests.
			eT := binomial(rng, batch, s*pT)
			eC := binomial(rng, batch-eT, (1-s)*pC/(1-s*pT))
			test.Fold(s, eT, eC)
			n += batch
			if test.Breached() {
				return n
			}
		}
	}
	return -1
}

// skewedRun is nominalRun when treatment actually receives trueShare(s) of
// the requests (heavy users bucketed into treatment, say) while the flag's
// percentage is s. With realized set, each batch is folded at the share of
// requests it actually had, pooling batches that lack an arm, as the Ramp
// does; otherwise at the nominal share.
func skewedRun(rng *rand.Rand, factor, ratio, pC float64, trueShare func(float64) float64, realized bool) int {
	test, err := NewTest(factor, DefaultAlpha)
	if err != nil {
		panic(err)
	}
	pT := ratio * pC
	var reqs, errs, seenReqs, seenErrs [2]uint64
	n := 0
	for _, s := range rampSchedule {
		for range stepRequests / batch {
			nT := binomial(rng, batch, trueShare(s))
			eT := binomial(rng, nT, pT)
			eC := binomial(rng, batch-nT, pC)
			if realized {
				reqs[Treatment] += nT
				reqs[Control] += batch - nT
				errs[Treatment] += eT
				errs[Control] += eC
				foldCounts(test, reqs, errs, &seenReqs, &seenErrs)
			} else {
				test.Fold(s, eT, eC)
			}
			n += batch
			if test.Breached() {
				return n
			}
		}
	}
	return -1
}

// alarmRate runs runs simulations and returns the fraction that breached and
// the sorted detection points of those that did.
func alarmRate(runs int, run func() int) (float64, []int) {
	var hits []int
	for range runs {
		if n := run(); n >= 0 {
			hits = append(hits, n)
		}
	}
	slices.Sort(hits)
	return float64(len(hits)) / float64(runs), hits
}

// binomialTolerance is three standard errors of a proportion alpha estimated
// from runs trials.
func binomialTolerance(alpha float64, runs int) float64 {
	return 3 * math.Sqrt(alpha*(1-alpha)/float64(runs))
}

// lognormal draws a latency whose logarithm is normal with the given median
// and log-space standard deviation.
func lognormal(rng *rand.Rand, median time.Duration, sigma float64) time.Duration {
	return time.Duration(float64(median) * math.Exp(sigma*rng.NormFloat64()))
}

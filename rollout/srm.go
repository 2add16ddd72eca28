package rollout

import (
	"fmt"
	"hash/maphash"
	"math"
	"sync"
	"sync/atomic"
)

// srmShifts is the grid of alternatives of the sample-ratio test, as shifts
// of the log-odds of a new user landing in treatment: the test bets, with
// equal weights, on each of "the odds are e^δ times what the configuration
// says", in both directions, since an assignment that starves treatment is
// as broken as one that floods it. The smallest shift (about 10 % on the
// odds) sets how subtle a mismatch the test is tuned for; larger ones find
// gross mismatches within a few dozen users.
var srmShifts = [...]float64{-2, -1, -0.5, -0.25, -0.1, 0.1, 0.25, 0.5, 1, 2}

var srmLogWeight = -math.Log(float64(len(srmShifts)))

// RatioTest is an anytime-valid test that units (users) fall into treatment
// with the probability the configuration says: a sequential test for sample
// ratio mismatch in the manner of Lindon & Malek ("Anytime-Valid Inference
// for Multinomial Count Data", arXiv:2011.03567), for two arms.
//
// Each unit is one Bernoulli trial: treatment with probability q under the
// null, where q may change from trial to trial (the step of a ramp) but is
// fixed before the trial's outcome is seen. Under each alternative k the
// log-odds are shifted by δ_k, so that treatment has probability
// p_k = q·e^δ / (1 − q + q·e^δ). A trial multiplies M_k by p_k/q or by
// (1−p_k)/(1−q); each factor has expectation exactly 1 under the null, so
// every M_k and the mixture E = Σ_k M_k / K are nonnegative martingales, and
// by Ville's inequality E ever reaches 1/α with probability at most α,
// however often it is looked at. Lindon & Malek mix over a Dirichlet prior
// instead of a grid; the grid keeps the test valid when q changes between
// trials, which a conjugate prior does not.
//
// A RatioTest is not safe for concurrent use.
type RatioTest struct {
	alpha    float64
	logBound float64
	logM     [len(srmShifts)]float64
	// treatment and control count the trials folded; expected is the sum of
	// their null probabilities of treatment.
	treatment, control uint64
	expected           float64
	breached           bool
}

// NewRatioTest returns a sample-ratio test at level alpha, in (0, 1).
func NewRatioTest(alpha float64) (*RatioTest, error) {
	if !(alpha > 0 && alpha < 1) {
		return nil, fmt.Errorf("rollout: ratio test alpha %v: must be in (0, 1)", alpha)
	}
	return newRatioTest(alpha), nil
}

func newRatioTest(alpha float64) *RatioTest {
	return &RatioTest{alpha: alpha, logBound: -math.Log(alpha)}
}

// Fold adds treatmentUnits and controlUnits trials, all made while the null
// probability of treatment was q. A q of 0 or 1 (or outside, or NaN) is
// skipped: there the outcome says nothing a test can weigh.
func (t *RatioTest) Fold(q float64, treatmentUnits, controlUnits uint64) {
	if !(q > 0 && q < 1) || treatmentUnits == 0 && controlUnits == 0 {
		return
	}
	nt, nc := float64(treatmentUnits), float64(controlUnits)
	for k, d := range srmShifts {
		// log(1 − q + q·e^δ), the normaliser, written with log1p for
		// precision at small q.
		logNorm := math.Log1p(q * math.Expm1(d))
		t.logM[k] += nt*(d-logNorm) - nc*logNorm
	}
	t.treatment += treatmentUnits
	t.control += controlUnits
	t.expected += q * (nt + nc)
	if t.logEValue() >= t.logBound {
		t.breached = true
	}
}

func (t *RatioTest) logEValue() float64 { return logSumExp(t.logM[:]) + srmLogWeight }

// EValue returns the current e-value (1 before any trial), saturating at
// math.MaxFloat64.
func (t *RatioTest) EValue() float64 { return min(math.Exp(t.logEValue()), math.MaxFloat64) }

// Threshold returns 1/alpha.
func (t *RatioTest) Threshold() float64 { return 1 / t.alpha }

// Breached reports whether the e-value has reached 1/alpha; it stays set.
func (t *RatioTest) Breached() bool { return t.breached }

// Units returns the trials folded in from each arm.
func (t *RatioTest) Units() (treatment, control uint64) { return t.treatment, t.control }

// Expected returns the number of treatment trials the null expects among
// those folded.
func (t *RatioTest) Expected() float64 { return t.expected }

// Sample sizes of the distinct-user sample behind the ratio test.
const (
	// userSampleCap is the most users the sample holds; past it the
	// sampling rate halves.
	userSampleCap = 4096
	// userSlots is the size of the open-addressing table (load at most 1/2).
	userSlots = 2 * userSampleCap
)

// userSample decides which users are new to a ramp, in bounded memory: it
// keeps the hashes of users below a threshold τ (at first every user), and
// when it is full it halves τ and forgets the users above it (distinct
// sampling, as Gibbons's). A user is "new" when its hash is below τ and not
// yet kept; only new users become trials of the ratio test, each once.
//
// That keeps the test valid: which users are sampled depends only on a hash
// of their id under a seed of the sample's own, unrelated to PostHog's
// rollout hash, so a sampled user's arm is as random as anyone's; and a user
// forgotten when τ halves is above the new τ, so it is never sampled (or
// counted) again.
//
// The request path reads τ atomically and takes the mutex only for users
// below it, which after the first halving is a fraction of them.
type userSample struct {
	seed maphash.Seed
	// tau: hashes below it are sampled; 0 means every hash (the full range).
	tau atomic.Uint64

	mu    sync.Mutex
	slots [userSlots]uint64 // 0 is empty; hash 0 is stored as 1
	n     int
	// keep is the scratch space of a halving, so that it allocates nothing.
	keep [userSampleCap]uint64
	// pending counts the new users of each arm since the last take, by the
	// expected share in force when they came.
	pending map[float64]*[2]uint64
}

func newUserSample() *userSample {
	return &userSample{seed: maphash.MakeSeed(), pending: map[float64]*[2]uint64{}}
}

func (s *userSample) sampled(h uint64) bool {
	tau := s.tau.Load()
	return tau == 0 || h < tau
}

// observe notes a request from the user with the given id, served by arm,
// while the expected share of treatment among new users was q. It is
// lock-free unless the user is sampled.
func (s *userSample) observe(id string, arm Arm, q float64) {
	h := maphash.String(s.seed, id)
	if !s.sampled(h) {
		return
	}
	if h == 0 {
		h = 1
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.sampled(h) || !s.insertLocked(h) {
		return
	}
	c := s.pending[q]
	if c == nil {
		c = new([2]uint64)
		s.pending[q] = c
	}
	c[arm]++
	if s.n >= userSampleCap {
		s.halveLocked()
	}
}

// insertLocked adds h and reports whether it was new.
func (s *userSample) insertLocked(h uint64) bool {
	for i := h % userSlots; ; i = (i + 1) % userSlots {
		switch s.slots[i] {
		case h:
			return false
		case 0:
			s.slots[i] = h
			s.n++
			return true
		}
	}
}

// halveLocked halves τ and rebuilds the table with the users below it.
func (s *userSample) halveLocked() {
	tau := s.tau.Load()
	if tau == 0 {
		tau = 1 << 63
	} else {
		tau /= 2
	}
	s.tau.Store(tau)
	keep := s.keep[:0]
	for _, h := range s.slots {
		if h != 0 && h < tau {
			keep = append(keep, h)
		}
	}
	s.slots = [userSlots]uint64{}
	s.n = 0
	for _, h := range keep {
		s.insertLocked(h)
	}
}

// take returns and clears the pending trials.
func (s *userSample) take() map[float64]*[2]uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.pending) == 0 {
		return nil
	}
	p := s.pending
	s.pending = map[float64]*[2]uint64{}
	return p
}

// rate is the fraction of users sampled now.
func (s *userSample) rate() float64 {
	tau := s.tau.Load()
	if tau == 0 {
		return 1
	}
	return float64(tau) / math.Exp2(64)
}

package rollout

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// BreachAction is what a ramp does when a guardrail is breached.
type BreachAction uint8

const (
	// Rollback forces the flag off (percentage 0) and ends the ramp.
	Rollback BreachAction = iota
	// Hold keeps the current percentage and waits for an operator to resume
	// or abort.
	Hold
)

// String returns "rollback" or "hold".
func (a BreachAction) String() string {
	switch a {
	case Rollback:
		return "rollback"
	case Hold:
		return "hold"
	}
	return fmt.Sprintf("BreachAction(%d)", uint8(a))
}

// Guardrail kinds.
const (
	// KindErrorRate guards treatment's error rate (5xx or transport errors).
	KindErrorRate = "error_rate"
	// KindLatency guards the rate of treatment requests slower than control's
	// latency quantile plus a margin.
	KindLatency = "latency"
)

// Defaults applied to zero fields.
const (
	// DefaultAlpha is the false-alarm probability of each guardrail.
	DefaultAlpha = 0.05
	// DefaultMinControl is how many control latencies a latency guardrail
	// collects before freezing its threshold.
	DefaultMinControl = 200
)

// GuardrailConfig describes one guardrail.
//
// An error_rate guardrail with Factor F breaches when treatment's error rate
// is credibly more than F times control's: "error_rate 2x" is Factor 2.
//
// A latency guardrail such as "latency p99 +250ms" (Quantile 0.99, Delta
// 250ms) calls a request slow when it takes longer than control's Quantile
// latency plus Delta, and breaches when treatment's slow requests are credibly
// more frequent than Factor times control's (Factor defaults to 1). The
// threshold is estimated from the first MinControl control latencies and then
// frozen, so that both arms are judged by the same fixed yardstick; no
// request is judged before that.
type GuardrailConfig struct {
	Kind     string        // KindErrorRate or KindLatency
	Factor   float64       // tolerated ratio of event rates; >= 1 (latency: 0 means 1)
	Quantile float64       // latency: control quantile in (0, 1), e.g. 0.99
	Delta    time.Duration // latency: margin over the quantile, >= 0
	// MinControl is the number of control latencies behind a latency
	// threshold (0 means DefaultMinControl).
	MinControl uint64
}

// String names the guardrail the way an operator would write it, e.g.
// "error_rate 2x" or "latency p99 +250ms".
func (g GuardrailConfig) String() string {
	switch g.Kind {
	case KindErrorRate:
		return fmt.Sprintf("error_rate %sx", strconv.FormatFloat(g.Factor, 'g', 6, 64))
	case KindLatency:
		s := fmt.Sprintf("latency p%s +%s", strconv.FormatFloat(g.Quantile*100, 'g', 6, 64), g.Delta)
		if g.Factor > 1 {
			s += fmt.Sprintf(" %sx", strconv.FormatFloat(g.Factor, 'g', 6, 64))
		}
		return s
	}
	return g.Kind
}

func (g GuardrailConfig) validate() error {
	finite := g.Factor <= MaxFactor
	switch g.Kind {
	case KindErrorRate:
		if !(g.Factor >= 1) || !finite {
			return fmt.Errorf("error_rate factor %v: must be in [1, %g]", g.Factor, float64(MaxFactor))
		}
	case KindLatency:
		if g.Factor != 0 && !(g.Factor >= 1) || !finite {
			return fmt.Errorf("latency factor %v: must be in [1, %g] (or 0 for 1)", g.Factor, float64(MaxFactor))
		}
		if !(g.Quantile > 0 && g.Quantile < 1) {
			return fmt.Errorf("latency quantile %v: must be in (0, 1)", g.Quantile)
		}
		if g.Delta < 0 {
			return fmt.Errorf("latency delta %v: must not be negative", g.Delta)
		}
	default:
		return fmt.Errorf("unknown guardrail kind %q (want %q or %q)", g.Kind, KindErrorRate, KindLatency)
	}
	return nil
}

// Config describes a ramp.
type Config struct {
	// Steps are the rollout percentages, strictly increasing, each in (0, 100].
	Steps []float64
	// StepDuration is the minimum time spent on each step.
	StepDuration time.Duration
	// MinRequests is the minimum number of treatment requests on a step
	// before it is promoted.
	MinRequests uint64
	// Guardrails watch treatment throughout the ramp; none is allowed.
	Guardrails []GuardrailConfig
	// OnBreach says what a breach does.
	OnBreach BreachAction
	// Alpha is each guardrail's false-alarm probability, in (0, 1); 0 means
	// DefaultAlpha. The sample-ratio check uses it too.
	Alpha float64
	// DryRun runs the ramp without enforcing it: every step, guardrail and
	// sample-ratio check is evaluated, observed, judged and reported as
	// usual, but Cap never limits the flag, so requests are routed as the
	// flag's own definition says, and a breach that would roll back kills
	// nothing.
	DryRun bool
}

// Validate reports the first problem with c, if any.
func (c Config) Validate() error {
	if len(c.Steps) == 0 {
		return errors.New("rollout: no steps")
	}
	for i, p := range c.Steps {
		if !(p > 0 && p <= 100) {
			return fmt.Errorf("rollout: step %d: percentage %v not in (0, 100]", i+1, p)
		}
		if i > 0 && !(p > c.Steps[i-1]) {
			return fmt.Errorf("rollout: step %d: percentage %v does not exceed the previous step's %v", i+1, p, c.Steps[i-1])
		}
	}
	if c.StepDuration < 0 {
		return fmt.Errorf("rollout: step duration %v is negative", c.StepDuration)
	}
	for i, g := range c.Guardrails {
		if err := g.validate(); err != nil {
			return fmt.Errorf("rollout: guardrail %d: %w", i+1, err)
		}
	}
	if c.OnBreach != Rollback && c.OnBreach != Hold {
		return fmt.Errorf("rollout: unknown breach action %v", c.OnBreach)
	}
	if c.Alpha != 0 && !(c.Alpha > 0 && c.Alpha < 1) {
		return fmt.Errorf("rollout: alpha %v not in (0, 1)", c.Alpha)
	}
	return nil
}

// State is the phase a ramp is in.
type State string

// Ramp states. RolledBack, Completed and Aborted are final.
const (
	Running    State = "running"     // promoting step by step
	Paused     State = "paused"      // promotion frozen by an operator; guardrails still act
	Held       State = "held"        // a guardrail fired with OnBreach Hold
	RolledBack State = "rolled_back" // a guardrail fired with OnBreach Rollback
	Completed  State = "completed"   // every step passed
	Aborted    State = "aborted"     // stopped by an operator
)

// Ended reports whether s is final: RolledBack, Completed or Aborted. Only
// starting the rollout over (a new attempt) leaves an ended state.
func (s State) Ended() bool { return s == RolledBack || s == Completed || s == Aborted }

func (s State) valid() bool {
	switch s {
	case Running, Paused, Held, RolledBack, Completed, Aborted:
		return true
	}
	return false
}

// Event kinds.
const (
	EventPromoted   = "promoted"
	EventCompleted  = "completed"
	EventRolledBack = "rolled_back"
	EventHeld       = "held"
)

// SampleRatioGuard is the name a sample-ratio mismatch is reported under, in
// the place of a guardrail's name: in Event.Guardrail, Change.Guardrail and
// the reason of a held ramp.
const SampleRatioGuard = "sample_ratio"

// Cap is what the proxy must enforce for a ramp: the flag forced off
// (Killed), or each of its conditions gated at min(own rollout, Percentage).
// A Percentage of 100 limits nothing.
type Cap struct {
	Percentage float64 `json:"percentage"`
	Killed     bool    `json:"killed,omitempty"`
}

// capOf is the one place that decides what a ramp in a state enforces: a dry
// run enforces nothing, whatever its state; otherwise a rolled-back or
// aborted ramp kills the flag and any other caps it at its percentage.
func capOf(cfg *Config, state State, pct float64) Cap {
	if cfg.DryRun {
		return Cap{Percentage: 100}
	}
	return Cap{Percentage: pct, Killed: state == RolledBack || state == Aborted}
}

// Event describes a transition made by Tick. The zero Event (Kind "") means
// nothing happened.
type Event struct {
	Kind string // EventPromoted, EventCompleted, EventRolledBack or EventHeld
	// From and To are the percentages enforced before and after.
	From, To float64
	// Guardrail names the breached guardrail and EValue is its e-value
	// (rolled_back and held only).
	Guardrail string
	EValue    float64
}

// ErrInvalidTransition is returned (wrapped) by the control methods when the
// ramp's state does not allow the requested change.
var ErrInvalidTransition = errors.New("rollout: invalid transition")

// armCounters holds one arm's request counters, padded to a cache line so
// that the two arms' counters do not contend.
type armCounters struct {
	requests atomic.Uint64
	errors   atomic.Uint64
	_        [48]byte
}

// guard is a configured guardrail and its test.
type guard struct {
	cfg  GuardrailConfig
	name string
	test *Test
	lat  *latencyGuard // nil for error_rate guardrails
}

// Ramp drives one flag's rollout through its steps. Observe may be called from
// any number of goroutines without locking; the other methods serialise on a
// mutex, and Percentage and Killed are lock-free as well, so the proxy can
// consult them on every request.
type Ramp struct {
	arms    [2]armCounters
	latency []*latencyGuard // the latency guards, for Observe

	// pct holds math.Float64bits of the ramp's percentage, and cap the Cap
	// to enforce. Both are written under mu.
	pct atomic.Uint64
	cap atomic.Pointer[Cap]

	// users samples the distinct users each arm served, for the ratio test;
	// share holds math.Float64bits of the expected treatment share last
	// reported with a user (NaN before any, or when it is unknown).
	users atomic.Pointer[userSample]
	share atomic.Uint64

	cfg Config

	mu        sync.Mutex
	state     State
	step      int
	stepStart time.Time
	changedAt time.Time
	reason    string
	guards    []*guard
	ratio     *RatioTest
	// seenRequests and seenErrors are the totals already folded into the
	// error-rate tests; stepRequests and stepErrors the totals when the
	// current step started.
	seenRequests, seenErrors [2]uint64
	stepRequests, stepErrors [2]uint64
}

// NewRamp validates cfg and starts a ramp on its first step at now.
func NewRamp(cfg Config, now time.Time) (*Ramp, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.Steps = append([]float64(nil), cfg.Steps...)
	cfg.Guardrails = append([]GuardrailConfig(nil), cfg.Guardrails...)
	if cfg.Alpha == 0 {
		cfg.Alpha = DefaultAlpha
	}
	r := &Ramp{cfg: cfg, state: Running, stepStart: now, changedAt: now}
	r.share.Store(math.Float64bits(math.NaN()))
	for i := range cfg.Guardrails {
		g := &cfg.Guardrails[i]
		gd := &guard{}
		if g.Kind == KindLatency {
			if g.Factor == 0 {
				g.Factor = 1
			}
			if g.MinControl == 0 {
				g.MinControl = DefaultMinControl
			}
			gd.lat = newLatencyGuard(g.Quantile, g.Delta, g.MinControl)
			r.latency = append(r.latency, gd.lat)
		}
		gd.cfg, gd.name = *g, g.String()
		r.guards = append(r.guards, gd)
	}
	r.resetTests()
	r.publish()
	return r, nil
}

// Observe records one request served by arm, whether it failed (5xx or
// transport error) and its latency. It is the hot path: atomic counters only,
// no locks, no allocation. Requests reported with an unknown arm are ignored.
func (r *Ramp) Observe(arm Arm, failed bool, latency time.Duration) {
	if arm > Treatment {
		return
	}
	a := &r.arms[arm]
	// The request is counted before its error so that a reader that loads
	// errors first never sees more errors than requests.
	a.requests.Add(1)
	if failed {
		a.errors.Add(1)
	}
	for _, g := range r.latency {
		g.observe(arm, latency)
	}
}

// ObserveUser reports a request of the user with the given distinct id,
// served by arm, whose answer was decided by the flag's conditions and hash
// (a matching user, in or out of the rollout; not an undecided answer, nor a
// user no condition matched), while the share of such users the
// configuration puts in treatment was share. Each user is a trial of the
// sample-ratio check once, at its first sampled request (see userSample);
// a share outside (0, 1) (NaN when it is not known) is reported but not
// tested. It is lock-free for users outside the sample.
func (r *Ramp) ObserveUser(id string, arm Arm, share float64) {
	if arm > Treatment {
		return
	}
	if old := r.share.Load(); math.Float64frombits(old) != share {
		r.share.Store(math.Float64bits(share))
	}
	if !(share > 0 && share < 1) {
		return
	}
	r.users.Load().observe(id, arm, share)
}

// Tick folds the observations since the previous tick into the guardrails and
// the sample-ratio check, then makes at most one transition: a breach while
// Running or Paused rolls back or holds; a sample-ratio mismatch holds
// (whatever OnBreach says: a broken assignment says nothing against the new
// side, but no step may be promoted on it); otherwise, while Running, a step
// that has lasted StepDuration and carried MinRequests treatment requests is
// promoted (or the ramp completes after the last step). It returns the
// transition made, if any.
//
// Observations are weighed by the treatment share of the requests actually
// observed since the previous fold, not by the step's nominal percentage:
// flags bucket users, not requests, so a few heavy users can skew the
// request share far from the percentage, and a test fed the nominal share
// would mistake that skew for a difference in error rates.
func (r *Ramp) Tick(now time.Time) Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fold()
	if r.state != Running && r.state != Paused {
		return Event{}
	}
	for _, g := range r.guards {
		if g.test.Breached() {
			return r.breach(g, now)
		}
	}
	if r.ratio.Breached() {
		return r.mismatch(now)
	}
	if r.state == Running && r.stepDone(now) {
		return r.advance(now)
	}
	return Event{}
}

// Due reports whether Tick would make a transition now. It folds the
// observations so far, as Tick does, and changes nothing else, so a caller
// can find out cheaply whether a change (which it may have to persist) is
// coming before it prepares for one.
func (r *Ramp) Due(now time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fold()
	if r.state != Running && r.state != Paused {
		return false
	}
	for _, g := range r.guards {
		if g.test.Breached() {
			return true
		}
	}
	return r.ratio.Breached() || r.state == Running && r.stepDone(now)
}

// fold feeds every guardrail the counts since its last fold.
func (r *Ramp) fold() {
	var errs, reqs [2]uint64
	for a := range r.arms {
		errs[a] = r.arms[a].errors.Load()
	}
	for a := range r.arms {
		reqs[a] = r.arms[a].requests.Load()
	}
	for _, g := range r.guards {
		if g.lat != nil {
			g.lat.fold(g.test)
		}
	}
	// Every error-rate guardrail weighs the same counts: each folds from the
	// same seen totals, which then advance once.
	seenReqs, seenErrs := r.seenRequests, r.seenErrors
	for _, g := range r.guards {
		if g.lat == nil {
			seenReqs, seenErrs = r.seenRequests, r.seenErrors
			foldCounts(g.test, reqs, errs, &seenReqs, &seenErrs)
		}
	}
	r.seenRequests, r.seenErrors = seenReqs, seenErrs
	for q, c := range r.users.Load().take() {
		r.ratio.Fold(q, c[Treatment], c[Control])
	}
}

func (r *Ramp) stepDone(now time.Time) bool {
	if now.Sub(r.stepStart) < r.cfg.StepDuration {
		return false
	}
	return r.arms[Treatment].requests.Load()-r.stepRequests[Treatment] >= r.cfg.MinRequests
}

func (r *Ramp) breach(g *guard, now time.Time) Event {
	e := g.test.EValue()
	ev := Event{From: r.percentage(), Guardrail: g.name, EValue: e}
	r.reason = fmt.Sprintf("%s: e-value %.4g reached %.4g", g.name, e, g.test.Threshold())
	if r.cfg.OnBreach == Hold {
		r.setState(Held, now)
		ev.Kind = EventHeld
	} else {
		r.setState(RolledBack, now)
		ev.Kind = EventRolledBack
	}
	ev.To = r.percentage()
	return ev
}

// mismatch holds the ramp on a sample-ratio mismatch.
func (r *Ramp) mismatch(now time.Time) Event {
	e := r.ratio.EValue()
	t, c := r.ratio.Units()
	r.reason = fmt.Sprintf("%s: %d of %d new users in treatment, %.4g expected; e-value %.4g reached %.4g",
		SampleRatioGuard, t, t+c, r.ratio.Expected(), e, r.ratio.Threshold())
	r.setState(Held, now)
	return Event{Kind: EventHeld, From: r.percentage(), To: r.percentage(), Guardrail: SampleRatioGuard, EValue: e}
}

// advance moves to the next step, or completes the ramp after the last one.
// The state is otherwise left alone, so a paused ramp promoted by hand stays
// paused.
func (r *Ramp) advance(now time.Time) Event {
	from := r.percentage()
	if r.step == len(r.cfg.Steps)-1 {
		r.setState(Completed, now)
		return Event{Kind: EventCompleted, From: from, To: r.percentage()}
	}
	r.step++
	r.startStep(now)
	r.publish()
	return Event{Kind: EventPromoted, From: from, To: r.percentage()}
}

// startStep restarts the step clock and the per-step counters.
func (r *Ramp) startStep(now time.Time) {
	r.stepStart = now
	for a := range r.arms {
		r.stepErrors[a] = r.arms[a].errors.Load()
		r.stepRequests[a] = r.arms[a].requests.Load()
	}
}

// resetTests gives every guardrail a fresh test and discards the counts not
// yet folded, so the new tests only see what happens from now on. Latency
// thresholds are kept: they depend on control traffic alone, before any
// request they judge.
func (r *Ramp) resetTests() {
	for _, g := range r.guards {
		g.test = newTest(g.cfg.Factor, r.cfg.Alpha)
		if g.lat != nil {
			g.lat.skip()
		}
	}
	// The sample starts afresh with the test: users counted towards the old
	// one are trials of the new one again at their next request.
	r.ratio = newRatioTest(r.cfg.Alpha)
	r.users.Store(newUserSample())
	for a := range r.arms {
		r.seenErrors[a] = r.arms[a].errors.Load()
		r.seenRequests[a] = r.arms[a].requests.Load()
	}
}

func (r *Ramp) setState(s State, now time.Time) {
	r.state = s
	r.changedAt = now
	r.publish()
}

// percentage is Percentage computed from the guarded fields.
func (r *Ramp) percentage() float64 {
	switch r.state {
	case Completed:
		return 100
	case RolledBack, Aborted:
		return 0
	}
	return r.cfg.Steps[r.step]
}

// publish makes the percentage and the cap visible to lock-free readers.
func (r *Ramp) publish() {
	pct := r.percentage()
	r.pct.Store(math.Float64bits(pct))
	c := capOf(&r.cfg, r.state, pct)
	r.cap.Store(&c)
}

// Pause freezes promotion. Observations still count and guardrails still act.
// Only a Running ramp can be paused.
func (r *Ramp) Pause(now time.Time) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state != Running {
		return fmt.Errorf("%w: cannot pause a ramp that is %s", ErrInvalidTransition, r.state)
	}
	r.setState(Paused, now)
	return nil
}

// Resume sets a Paused or Held ramp running again.
//
// A paused ramp keeps its step clock: time spent paused counts towards the
// step, as the step's traffic was exposed and watched throughout. A held ramp
// restarts its guardrail statistics and its step: the operator has judged the
// breach, so the evidence behind it is spent, and the step must then earn its
// promotion afresh under the new statistics.
func (r *Ramp) Resume(now time.Time) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch r.state {
	case Paused:
	case Held:
		r.resetTests()
		r.startStep(now)
		r.reason = ""
	default:
		return fmt.Errorf("%w: cannot resume a ramp that is %s", ErrInvalidTransition, r.state)
	}
	r.setState(Running, now)
	return nil
}

// Promote advances one step now, whatever the step's duration and request
// count; on the last step it completes the ramp. It keeps a Paused or Held
// ramp in that state, and fails once the ramp has ended.
func (r *Ramp) Promote(now time.Time) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state.Ended() {
		return fmt.Errorf("%w: cannot promote a ramp that is %s", ErrInvalidTransition, r.state)
	}
	r.advance(now)
	return nil
}

// Abort ends the ramp and forces the flag off. It fails once the ramp has
// ended.
func (r *Ramp) Abort(now time.Time) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state.Ended() {
		return fmt.Errorf("%w: cannot abort a ramp that is %s", ErrInvalidTransition, r.state)
	}
	r.setState(Aborted, now)
	return nil
}

// Percentage is the ramp's rollout percentage now: the current step's while
// Running, Paused or Held, 100 once Completed, 0 when RolledBack or Aborted.
// It is what the ramp reports; what the proxy enforces is Cap, which differs
// in a dry run. It is lock-free.
func (r *Ramp) Percentage() float64 { return math.Float64frombits(r.pct.Load()) }

// Cap is what the proxy must enforce now (see capOf). It is lock-free.
func (r *Ramp) Cap() Cap { return *r.cap.Load() }

// DryRun reports whether the ramp runs without being enforced.
func (r *Ramp) DryRun() bool { return r.cfg.DryRun }

// State returns the ramp's current state.
func (r *Ramp) State() State {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.state
}

// ArmCounts counts one arm's requests and failed requests.
type ArmCounts struct {
	Requests uint64 `json:"requests"`
	Errors   uint64 `json:"errors"`
}

// Counts holds both arms' counts.
type Counts struct {
	Control   ArmCounts `json:"control"`
	Treatment ArmCounts `json:"treatment"`
}

// GuardrailStatus is a snapshot of one guardrail.
type GuardrailStatus struct {
	Name string `json:"name"`
	Kind string `json:"kind"`
	// EValue is the current e-value and Threshold the one that breaches
	// (1/alpha).
	EValue    float64 `json:"e_value"`
	Threshold float64 `json:"threshold"`
	Breached  bool    `json:"breached"`
	// TreatmentEvents and ControlEvents count the events (errors, or slow
	// requests) the test has weighed.
	TreatmentEvents uint64 `json:"treatment_events"`
	ControlEvents   uint64 `json:"control_events"`
	// ControlSamples is, for a latency guardrail, the number of control
	// latencies recorded towards the threshold (it stops growing once the
	// threshold is frozen).
	ControlSamples uint64 `json:"control_samples,omitempty"`
	// LatencyThresholdMS is a latency guardrail's frozen threshold in
	// milliseconds; absent until frozen.
	LatencyThresholdMS *float64 `json:"latency_threshold_ms,omitempty"`
}

// SampleRatioStatus is a snapshot of a ramp's sample-ratio check: the new
// users of each arm (those the flag's conditions matched, sampled), against
// the share of treatment the configuration expects.
type SampleRatioStatus struct {
	// ExpectedShare is the share of matching users the configuration puts
	// in treatment now; absent when it is not known (the flag is not
	// decided by one rollout gate for every matching user) or no user came.
	ExpectedShare *float64 `json:"expected_share,omitempty"`
	// TreatmentUsers and ControlUsers count the users tested, each once;
	// ExpectedTreatment is how many of them the configuration expects in
	// treatment.
	TreatmentUsers    uint64  `json:"treatment_users"`
	ControlUsers      uint64  `json:"control_users"`
	ExpectedTreatment float64 `json:"expected_treatment_users"`
	// SampledFraction is the fraction of users the bounded sample takes in
	// now (1 until it has been full once).
	SampledFraction float64 `json:"sampled_fraction"`
	EValue          float64 `json:"e_value"`
	Threshold       float64 `json:"threshold"`
	// Mismatch says the e-value reached the threshold: the split of users
	// is not what the configuration says, and the ramp holds.
	Mismatch bool `json:"mismatch"`
}

// Status is a JSON-friendly snapshot of a ramp.
type Status struct {
	State State `json:"state"`
	// DryRun says that the ramp is not enforced (see Config.DryRun): its
	// state and percentage are what it would do.
	DryRun bool `json:"dry_run,omitempty"`
	// Enforced is the cap the proxy enforces for the ramp now.
	Enforced Cap `json:"enforced"`
	// Step indexes Steps (from 0).
	Step          int       `json:"step"`
	Steps         []float64 `json:"steps"`
	Percentage    float64   `json:"percentage"`
	StepStartedAt time.Time `json:"step_started_at"`
	// ChangedAt is when the state last changed.
	ChangedAt time.Time `json:"changed_at"`
	// OnStep counts the requests since the current step started; Total since
	// the ramp was created.
	OnStep     Counts            `json:"on_step"`
	Total      Counts            `json:"total"`
	Guardrails []GuardrailStatus `json:"guardrails"`
	// SampleRatio is the sample-ratio check.
	SampleRatio SampleRatioStatus `json:"sample_ratio"`
	// Reason explains the breach that rolled back or held the ramp.
	Reason string `json:"reason,omitempty"`
}

// Status returns a snapshot of the ramp.
func (r *Ramp) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := Status{
		State:         r.state,
		Step:          r.step,
		Steps:         append([]float64(nil), r.cfg.Steps...),
		Percentage:    r.percentage(),
		StepStartedAt: r.stepStart,
		ChangedAt:     r.changedAt,
		Reason:        r.reason,
		Guardrails:    make([]GuardrailStatus, 0, len(r.guards)),
		DryRun:        r.cfg.DryRun,
		Enforced:      r.Cap(),
	}
	sr := &st.SampleRatio
	sr.TreatmentUsers, sr.ControlUsers = r.ratio.Units()
	sr.ExpectedTreatment = r.ratio.Expected()
	sr.SampledFraction = r.users.Load().rate()
	sr.EValue, sr.Threshold, sr.Mismatch = r.ratio.EValue(), r.ratio.Threshold(), r.ratio.Breached()
	if q := math.Float64frombits(r.share.Load()); q >= 0 && q <= 1 {
		sr.ExpectedShare = &q
	}
	var total [2]ArmCounts
	for a := range r.arms {
		total[a].Errors = r.arms[a].errors.Load()
		total[a].Requests = r.arms[a].requests.Load()
	}
	st.Total = Counts{Control: total[Control], Treatment: total[Treatment]}
	st.OnStep = Counts{
		Control:   ArmCounts{Requests: total[Control].Requests - r.stepRequests[Control], Errors: total[Control].Errors - r.stepErrors[Control]},
		Treatment: ArmCounts{Requests: total[Treatment].Requests - r.stepRequests[Treatment], Errors: total[Treatment].Errors - r.stepErrors[Treatment]},
	}
	for _, g := range r.guards {
		gs := GuardrailStatus{
			Name:      g.name,
			Kind:      g.cfg.Kind,
			EValue:    g.test.EValue(),
			Threshold: g.test.Threshold(),
			Breached:  g.test.Breached(),
		}
		gs.TreatmentEvents, gs.ControlEvents = g.test.Events()
		if g.lat != nil {
			gs.ControlSamples = g.lat.hist.Count()
			if th, ok := g.lat.frozen(); ok {
				ms := float64(th) / float64(time.Millisecond)
				gs.LatencyThresholdMS = &ms
			}
		}
		st.Guardrails = append(st.Guardrails, gs)
	}
	return st
}

// Progress is what must survive a restart for a ramp to carry on where it was.
//
// Guardrail statistics are deliberately not part of it: they restart from
// scratch on Restore. That is safe because a fresh e-process is still an
// e-process; restarting only throws away evidence gathered so far, which can
// delay a breach but never makes a false one more likely. (Carrying an
// e-value across a restart would also be valid, but the counts observed while
// the process was down are lost either way.) Latency thresholds are
// re-estimated from fresh control traffic for the same reason.
type Progress struct {
	State State `json:"state"`
	// Step indexes the configured steps (from 0), and StepPercentage is that
	// step's percentage, recorded so that a changed configuration is noticed
	// rather than silently reinterpreted.
	Step           int       `json:"step"`
	StepPercentage float64   `json:"step_percentage"`
	StepStartedAt  time.Time `json:"step_started_at"`
	ChangedAt      time.Time `json:"changed_at"`
	Reason         string    `json:"reason,omitempty"`
}

// Progress returns the ramp's progress, for persisting.
func (r *Ramp) Progress() Progress {
	r.mu.Lock()
	defer r.mu.Unlock()
	return Progress{
		State:          r.state,
		Step:           r.step,
		StepPercentage: r.cfg.Steps[r.step],
		StepStartedAt:  r.stepStart,
		ChangedAt:      r.changedAt,
		Reason:         r.reason,
	}
}

// Restore puts the ramp back where p says, after checking p against the
// configuration: a known state, a step index in range whose percentage (when
// recorded) matches the configured one, and a step start time. Guardrail
// statistics and per-step counts restart, and the step clock resumes from
// p.StepStartedAt.
func (r *Ramp) Restore(p Progress) error {
	if err := r.checkProgress(p); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.step = p.Step
	r.reason = p.Reason
	r.startStep(p.StepStartedAt)
	r.resetTests()
	for _, g := range r.latency {
		g.threshold.Store(-1)
		g.hist.Reset()
	}
	r.setState(p.State, p.changedAt())
	return nil
}

// Follow moves the ramp to p, progress another instance made on the same
// rollout, keeping the guardrail statistics: they judge this instance's own
// traffic, which a promotion or pause elsewhere does not make less telling,
// just as they carry over a promotion made here. The step clock and per-step
// counts restart only when p is on another step, or that step started at
// another time.
func (r *Ramp) Follow(p Progress) error {
	if err := r.checkProgress(p); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if p.Step != r.step || !p.StepStartedAt.Equal(r.stepStart) {
		r.step = p.Step
		r.startStep(p.StepStartedAt)
	}
	r.reason = p.Reason
	r.setState(p.State, p.changedAt())
	return nil
}

func (p Progress) changedAt() time.Time {
	if p.ChangedAt.IsZero() {
		return p.StepStartedAt
	}
	return p.ChangedAt
}

// checkProgress checks p against the ramp's configuration.
func (r *Ramp) checkProgress(p Progress) error {
	if !p.State.valid() {
		return fmt.Errorf("rollout: restore: unknown state %q", p.State)
	}
	if p.Step < 0 || p.Step >= len(r.cfg.Steps) {
		return fmt.Errorf("rollout: restore: step %d out of range [0, %d)", p.Step, len(r.cfg.Steps))
	}
	if p.StepPercentage != 0 && p.StepPercentage != r.cfg.Steps[p.Step] {
		return fmt.Errorf("rollout: restore: step %d is %v%% in the configuration but %v%% in the saved progress",
			p.Step, r.cfg.Steps[p.Step], p.StepPercentage)
	}
	if p.StepStartedAt.IsZero() {
		return errors.New("rollout: restore: no step start time")
	}
	return nil
}

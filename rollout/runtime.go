package rollout

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flagsplit/flagsplit/storedoc"
)

// Change kinds reported by a Runtime besides the Event kinds: operators'
// actions, and progress taken over from storage.
const (
	ChangePaused    = "paused"
	ChangeResumed   = "resumed"
	ChangeRestarted = "restarted"
	ChangeAborted   = "aborted"
	// ChangeAdopted: another instance sharing the storage (or this one
	// before a restart) moved the rollout; this instance follows.
	ChangeAdopted = "adopted"
)

// Operator actions accepted by Runtime.Act.
const (
	ActionPause   = "pause"
	ActionResume  = "resume"
	ActionPromote = "promote"
	ActionAbort   = "abort"
)

// Errors of Runtime.Act. Invalid transitions wrap ErrInvalidTransition.
var (
	ErrNoRollout     = errors.New("no rollout is configured for this flag")
	ErrUnknownAction = errors.New("unknown rollout action")
)

// ArmOf is the arm a request served with a flag value belongs to: "false" (also
// what undecided evaluations and fallbacks to the default upstream are served)
// and a multivariate flag's "control" variant are the old side; every other
// value is the side being rolled out.
func ArmOf(value string) Arm {
	if value == "false" || value == "control" {
		return Control
	}
	return Treatment
}

// FlagConfig is the configured rollout of one flag.
type FlagConfig struct {
	Flag   string
	Config Config
}

// Change describes a change of one rollout, for logs, metrics and events.
type Change struct {
	Flag string
	// Kind is an Event kind (promoted, completed, rolled_back, held) or a
	// Change kind (paused, resumed, restarted, aborted, adopted).
	Kind       string
	State      State
	Step       int
	Percentage float64
	// From and To are the percentages before and after, for promotions,
	// completions and breaches.
	From, To float64
	// Guardrail and EValue name the breached guardrail (SampleRatioGuard
	// for a sample-ratio mismatch).
	Guardrail string
	EValue    float64
	// DryRun says the rollout is a dry run: the change is what it would
	// have done, and nothing of it is enforced.
	DryRun bool
}

// Hooks connect a Runtime to what surrounds it. Every field is optional.
type Hooks struct {
	// Enforce is called as soon as a ramp's percentage or kill may have
	// changed, before anything is stored, so that the proxy enforces the
	// change at once.
	Enforce func()
	// Changed is told of every change of a rollout in force, after the
	// change (and its record) is made.
	Changed func(Change)
	// Kill sets the flag's persistent kill override when a guardrail rolls
	// the flag back; Lift removes that override again when an operator
	// starts the rolled-back rollout over. Both are called while the
	// rollout's record is locked in storage.
	Kill func(ctx context.Context, flag string) error
	Lift func(ctx context.Context, flag string) error
	// Problem reports trouble with the stored progress that the runtime
	// works around (it keeps the progress in memory).
	Problem func(msg string, flag string, err error)
}

// Record is one rollout's entry in the shared progress document.
type Record struct {
	// Fingerprint identifies the rollout's configuration: a record of
	// another configuration is not followed.
	Fingerprint string   `json:"fingerprint"`
	Progress    Progress `json:"progress"`
	// KillOverride says that the rollout's rollback set the flag's kill
	// override, which starting it over lifts.
	KillOverride bool `json:"kill_override,omitempty"`
	// Rev is the document revision the record was written at: a record
	// newer than the one a run follows supersedes it (subject to the rules
	// of Run.supersededBy).
	Rev uint64 `json:"rev"`
	// Attempt grows when an ended rollout starts over: a record of a later
	// attempt supersedes whatever an earlier one reached.
	Attempt   uint64    `json:"attempt,omitempty"`
	UpdatedAt time.Time `json:"updated_at"`
	// DryRun says the progress is a dry run's, which an enforced rollout
	// never carries on from: what a dry run reached was never enforced.
	DryRun bool `json:"dry_run,omitempty"`
}

// Records is the progress document shared by the instances using one
// storage: a record per flag.
type Records struct {
	Rollouts map[string]Record `json:"rollouts"`
}

// with returns a copy of rs with flag's record replaced.
func (rs Records) with(flag string, rec Record) Records {
	m := maps.Clone(rs.Rollouts)
	if m == nil {
		m = map[string]Record{}
	}
	m[flag] = rec
	return Records{Rollouts: m}
}

// Run is one flag's rollout as this instance runs it. Its ramp is replaced
// when an ended rollout starts over or progress is taken over from storage;
// the request path loads it for every observation.
type Run struct {
	flag        string
	fingerprint string
	cfg         Config
	ramp        atomic.Pointer[Ramp]

	mu sync.Mutex // guards the fields below
	// rev and stamp are those of the record this run is at (written or
	// followed), attempt the attempt it is on.
	rev     uint64
	stamp   time.Time
	attempt uint64
	// killOverride: this attempt's rollback set the kill override.
	killOverride bool
	// restored: stored progress was looked for when the run started.
	restored bool
}

// Flag returns the flag's key.
func (r *Run) Flag() string { return r.flag }

// Config returns the ramp's configuration.
func (r *Run) Config() Config { return r.cfg }

// Ramp returns the ramp in force.
func (r *Run) Ramp() *Ramp { return r.ramp.Load() }

// Observe counts one request served with the flag at value (see ArmOf). It is
// lock-free and does not allocate.
func (r *Run) Observe(value string, failed bool, latency time.Duration) {
	r.ramp.Load().Observe(ArmOf(value), failed, latency)
}

// ObserveUser reports the user behind a request served with the flag at value
// (see ArmOf), whose answer was decided by the flag's conditions and hash,
// for the sample-ratio check (see Ramp.ObserveUser). It is lock-free for
// users outside the ramp's sample and does not allocate.
func (r *Run) ObserveUser(id, value string, share float64) {
	r.ramp.Load().ObserveUser(id, ArmOf(value), share)
}

// RunStatus is a run's state as an operator sees it.
type RunStatus struct {
	Status
	// KillOverride says that the rollback of this attempt set the flag's
	// kill override.
	KillOverride bool `json:"kill_override,omitempty"`
	// Attempt counts the times the rollout started over.
	Attempt uint64 `json:"attempt,omitempty"`
	// StoredAt is when the progress record this run follows was written.
	StoredAt *time.Time `json:"stored_at,omitempty"`
}

// Status returns a snapshot of the run.
func (r *Run) Status() RunStatus {
	st := RunStatus{Status: r.ramp.Load().Status()}
	r.mu.Lock()
	defer r.mu.Unlock()
	st.KillOverride, st.Attempt = r.killOverride, r.attempt
	if !r.stamp.IsZero() {
		t := r.stamp
		st.StoredAt = &t
	}
	return st
}

// record is the run's progress as a record written at rev. Callers hold r.mu.
func (r *Run) recordLocked(rev uint64, now time.Time) Record {
	return Record{Fingerprint: r.fingerprint, Progress: r.ramp.Load().Progress(), KillOverride: r.killOverride,
		Rev: rev, Attempt: r.attempt, UpdatedAt: now, DryRun: r.cfg.DryRun}
}

// supersededBy reports whether a stored record replaces what the run is at.
// These are the ordering rules of shared progress, which need no clocks:
//   - a record of another configuration, or no newer than the run's, does not;
//   - a record of an earlier attempt does not, one of a later attempt does;
//   - within an attempt, an end (rollback, abort, completion) is never undone
//     by a record that has not ended (another instance that promoted before it
//     learnt of the end); any other newer record does.
//
// Callers hold r.mu.
func (r *Run) supersededByLocked(rec Record) bool {
	switch {
	case rec.Fingerprint != r.fingerprint || rec.Rev <= r.rev || rec.Attempt < r.attempt:
		return false
	case rec.Attempt > r.attempt:
		return true
	}
	return !(r.ramp.Load().State().Ended() && !rec.Progress.State.Ended())
}

// adoptLocked moves the run to rec, which supersedes it, and reports whether
// the ramp changed. Callers hold r.mu.
func (r *Run) adoptLocked(rec Record, now time.Time) bool {
	ramp := r.ramp.Load()
	cur := ramp.Progress()
	r.rev, r.stamp = rec.Rev, rec.UpdatedAt
	if rec.Attempt == r.attempt && cur.State == rec.Progress.State && cur.Step == rec.Progress.Step {
		r.killOverride = rec.KillOverride
		return false
	}
	if !cur.State.Ended() && rec.Attempt == r.attempt {
		if ramp.Follow(rec.Progress) != nil {
			return false
		}
		r.killOverride = rec.KillOverride
		return true
	}
	// A new attempt, or leaving an end: the statistics of the old ramp
	// belong to what is over.
	fresh, err := NewRamp(r.cfg, now)
	if err != nil || fresh.Restore(rec.Progress) != nil {
		return false
	}
	r.ramp.Store(fresh)
	r.attempt, r.killOverride = rec.Attempt, rec.KillOverride
	return true
}

// change describes the run's ramp now, as a Change of kind.
func (r *Run) change(kind string) Change {
	ramp := r.ramp.Load()
	p := ramp.Progress()
	return Change{Flag: r.flag, Kind: kind, State: p.State, Step: p.Step, Percentage: ramp.Percentage(), DryRun: ramp.DryRun()}
}

// Set is the rollouts of one configuration, by flag.
type Set struct {
	runs map[string]*Run
	// previous is the set this one replaced when it was put in force, kept
	// until this one's configuration is known to have taken over: a reload
	// that fails after starting puts it back.
	previous atomic.Pointer[Set]
}

// Run returns the flag's run, or nil.
func (s *Set) Run(flag string) *Run {
	if s == nil {
		return nil
	}
	return s.runs[flag]
}

// Runs returns the runs ordered by flag.
func (s *Set) Runs() []*Run {
	if s == nil {
		return nil
	}
	out := make([]*Run, 0, len(s.runs))
	for _, k := range slices.Sorted(maps.Keys(s.runs)) {
		out = append(out, s.runs[k])
	}
	return out
}

// Len returns the number of rollouts.
func (s *Set) Len() int {
	if s == nil {
		return 0
	}
	return len(s.runs)
}

// Runtime runs the rollouts in force on one instance across configuration
// reloads, and keeps their progress in a document shared with every instance
// using the same storage. Each operation takes the Hooks of the configuration
// performing it, so that the runtime outlives every configuration without
// holding on to any. Every change of a rollout, whatever made it (a tick,
// an operator's action), is one locked read-modify-write of that document:
// first the stored progress is taken over where it supersedes this
// instance's, then the change is made to the result, then it is written.
// Operators' actions and automatic promotions therefore act on the newest
// shared progress, and an instance never writes over a change it had not
// seen.
type Runtime struct {
	now func() time.Time

	// mu serialises changes, syncs and starts on this instance.
	mu sync.Mutex
	// hooks are those of the operation in progress (set under mu).
	hooks   Hooks
	inForce atomic.Pointer[Set]
	doc     atomic.Pointer[storedoc.Doc[Records]]
	// seen is the highest document revision offered so far.
	seen atomic.Uint64
}

// NewRuntime returns a runtime with no rollouts in force. now is its clock
// (nil: time.Now).
func NewRuntime(now func() time.Time) *Runtime {
	if now == nil {
		now = time.Now
	}
	return &Runtime{now: now}
}

// InForce returns the rollouts in force (nil before any were started).
func (rt *Runtime) InForce() *Set { return rt.inForce.Load() }

// fingerprint identifies a rollout's normalised configuration, so that a
// reload that changes nothing keeps the ramp and its statistics.
func fingerprint(flag string, cfg Config) string {
	raw, _ := json.Marshal(struct {
		Flag string
		Cfg  Config
	}{flag, cfg})
	sum := sha256.Sum256(raw)
	return hex.EncodeToString(sum[:8])
}

// Prepare validates a configuration's rollouts and returns their set, reusing
// the runs in force whose configuration is unchanged. It changes nothing in
// force.
func (rt *Runtime) Prepare(configs []FlagConfig) (*Set, error) {
	set := &Set{runs: make(map[string]*Run, len(configs))}
	inForce := rt.inForce.Load()
	now := rt.now()
	for _, fc := range configs {
		if fc.Flag == "" {
			return nil, errors.New("rollout: flag key is required")
		}
		if _, dup := set.runs[fc.Flag]; dup {
			return nil, fmt.Errorf("rollout %s configured twice", fc.Flag)
		}
		fp := fingerprint(fc.Flag, fc.Config)
		if old := inForce.Run(fc.Flag); old != nil && old.fingerprint == fp {
			set.runs[fc.Flag] = old
			continue
		}
		ramp, err := NewRamp(fc.Config, now)
		if err != nil {
			return nil, fmt.Errorf("rollout %s: %w", fc.Flag, err)
		}
		run := &Run{flag: fc.Flag, fingerprint: fp, cfg: fc.Config}
		run.ramp.Store(ramp)
		set.runs[fc.Flag] = run
	}
	return set, nil
}

// Start puts set in force, with its progress stored under doc: a new run
// carries on where the stored record of its rollout is (a restart), or where
// the run it replaces is (a reload that changed the rollout, when its step
// there still has the same percentage). It returns the set it replaced.
func (rt *Runtime) Start(ctx context.Context, set *Set, doc *storedoc.Doc[Records], hooks Hooks) *Set {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.hooks = hooks
	rt.doc.Store(doc)
	stored, _, err := doc.Read(ctx)
	if err != nil && set.Len() > 0 {
		rt.problem("rollout progress in storage ignored; rollouts start from their first step", "", err)
	}
	previous := rt.inForce.Load()
	for flag, run := range set.runs {
		if old := previous.Run(flag); old == run {
			continue
		}
		run.mu.Lock()
		if !run.restored {
			run.restored = true
			if rec, ok := stored.Value.Rollouts[flag]; ok && rec.DryRun == run.cfg.DryRun &&
				carry(run.ramp.Load(), rec.Progress, rec.Fingerprint == run.fingerprint) {
				run.rev, run.stamp, run.attempt, run.killOverride = rec.Rev, rec.UpdatedAt, rec.Attempt, rec.KillOverride
			}
		}
		if old := previous.Run(flag); old != nil && old.cfg.DryRun == run.cfg.DryRun {
			old.mu.Lock()
			if carry(run.ramp.Load(), old.ramp.Load().Progress(), false) {
				run.rev, run.stamp, run.attempt, run.killOverride = old.rev, old.stamp, old.attempt, old.killOverride
			}
			old.mu.Unlock()
		}
		run.mu.Unlock()
	}
	rt.seen.Store(max(rt.seen.Load(), stored.Revision))
	set.previous.Store(previous)
	rt.inForce.Store(set)
	return previous
}

// carry restores progress p into ramp. The progress of a rollout that had
// ended is only carried for the same configuration: a changed configuration
// is a new attempt. (Callers never carry a dry run's progress into an
// enforced rollout, nor the reverse.)
func carry(ramp *Ramp, p Progress, sameConfig bool) bool {
	if p.State.Ended() && !sameConfig {
		return false
	}
	return ramp.Restore(p) == nil
}

// Stop is told that set's configuration stopped. When set is still in force,
// the configuration it replaced is still running (the reload that started
// set failed), so that one's rollouts are put back in force; Stop then
// reports true. Otherwise set's successor has taken over for good.
func (rt *Runtime) Stop(set *Set) bool {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	previous := set.previous.Load()
	if rt.inForce.CompareAndSwap(set, previous) {
		set.previous.Store(nil)
		return true
	}
	if cur := rt.inForce.Load(); cur != nil {
		// The successor no longer needs a way back.
		cur.previous.CompareAndSwap(set, nil)
	}
	set.previous.Store(nil)
	return false
}

// Current implements storedoc.Holder: the records of the rollouts in force,
// at the highest document revision seen. It is the base of a write only when
// the storage lost the document.
func (rt *Runtime) Current() (storedoc.Version[Records], bool) {
	set := rt.inForce.Load()
	v := storedoc.Version[Records]{Revision: rt.seen.Load(), Value: Records{Rollouts: map[string]Record{}}}
	for flag, run := range set.runsMap() {
		run.mu.Lock()
		v.Value.Rollouts[flag] = run.recordLocked(run.rev, run.stamp)
		run.mu.Unlock()
	}
	return v, v.Revision > 0
}

func (s *Set) runsMap() map[string]*Run {
	if s == nil {
		return nil
	}
	return s.runs
}

// Offer implements storedoc.Holder: every run whose stored record supersedes
// it takes the record over. Callers hold rt.mu (Sync and change do).
func (rt *Runtime) Offer(v storedoc.Version[Records]) bool {
	if v.Revision < rt.seen.Load() {
		return false
	}
	rt.seen.Store(v.Revision)
	now := rt.now()
	var adopted []*Run
	for _, run := range rt.inForce.Load().Runs() {
		rec, ok := v.Value.Rollouts[run.flag]
		if !ok {
			continue
		}
		run.mu.Lock()
		if run.supersededByLocked(rec) && run.adoptLocked(rec, now) {
			adopted = append(adopted, run)
		}
		run.mu.Unlock()
	}
	if len(adopted) > 0 {
		rt.enforce()
	}
	for _, run := range adopted {
		rt.changed(run.change(ChangeAdopted))
	}
	return len(adopted) > 0
}

// Sync takes over the progress other instances sharing the storage made.
func (rt *Runtime) Sync(ctx context.Context, hooks Hooks) {
	doc := rt.doc.Load()
	if doc == nil || rt.inForce.Load().Len() == 0 {
		return
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.hooks = hooks
	if _, err := doc.Sync(ctx, rt); err != nil {
		rt.problem("syncing rollout progress from storage", "", err)
	}
}

// Tick advances every rollout in force whose ramp is due a transition.
func (rt *Runtime) Tick(ctx context.Context, hooks Hooks) {
	for _, run := range rt.inForce.Load().Runs() {
		if !run.ramp.Load().Due(rt.now()) {
			continue
		}
		_, _ = rt.change(ctx, run, hooks, func(ctx context.Context, run *Run, now time.Time) (Change, error) {
			ev := run.ramp.Load().Tick(now)
			if ev.Kind == "" {
				return Change{}, nil // taken over meanwhile by stored progress
			}
			rt.enforce()
			ch := run.change(ev.Kind)
			ch.From, ch.To, ch.Guardrail, ch.EValue = ev.From, ev.To, ev.Guardrail, ev.EValue
			// The ramp's Cap says whether its state kills the flag (a dry
			// run's never does), for the override as for the proxy.
			if ev.Kind == EventRolledBack && run.ramp.Load().Cap().Killed && rt.hooks.Kill != nil {
				// The kill is also an ordinary override: it holds when
				// the rollout is removed from the configuration, and
				// every instance sharing the storage obeys it.
				if err := rt.hooks.Kill(ctx, run.flag); err != nil {
					rt.problem("setting the rollback's kill override; the ramp still keeps the flag off here", run.flag, err)
				} else {
					run.mu.Lock()
					run.killOverride = true
					run.mu.Unlock()
				}
			}
			return ch, nil
		})
	}
}

// Act applies an operator's action to the flag's rollout in force: pause,
// resume (a rolled-back or aborted rollout starts over from its first step as
// a new attempt, lifting its rollback's kill override first), promote or
// abort. The action applies to the newest shared progress: an instance that
// has not yet seen another's abort refuses a promotion.
func (rt *Runtime) Act(ctx context.Context, flag, action string, hooks Hooks) (*Run, error) {
	run := rt.inForce.Load().Run(flag)
	if run == nil {
		return nil, ErrNoRollout
	}
	switch action {
	case ActionPause, ActionResume, ActionPromote, ActionAbort:
	default:
		return nil, fmt.Errorf("%w %q", ErrUnknownAction, action)
	}
	_, err := rt.change(ctx, run, hooks, func(ctx context.Context, run *Run, now time.Time) (Change, error) {
		ramp := run.ramp.Load()
		switch action {
		case ActionPause:
			if err := ramp.Pause(now); err != nil {
				return Change{}, err
			}
			return run.change(ChangePaused), nil
		case ActionAbort:
			if err := ramp.Abort(now); err != nil {
				return Change{}, err
			}
			return run.change(ChangeAborted), nil
		case ActionPromote:
			from := ramp.Percentage()
			if err := ramp.Promote(now); err != nil {
				return Change{}, err
			}
			kind := EventPromoted
			if ramp.State() == Completed {
				kind = EventCompleted
			}
			ch := run.change(kind)
			ch.From, ch.To = from, ramp.Percentage()
			return ch, nil
		}
		if state := ramp.State(); state != RolledBack && state != Aborted {
			if err := ramp.Resume(now); err != nil {
				return Change{}, err
			}
			return run.change(ChangeResumed), nil
		}
		run.mu.Lock()
		lift := run.killOverride
		run.mu.Unlock()
		if lift && rt.hooks.Lift != nil {
			// The operator asked to try again: the rollback's kill goes
			// first, and if it cannot, nothing changes.
			if err := rt.hooks.Lift(ctx, run.flag); err != nil {
				return Change{}, fmt.Errorf("lifting the rollback's kill override: %w", err)
			}
		}
		fresh, err := NewRamp(run.cfg, now)
		if err != nil {
			return Change{}, err
		}
		run.mu.Lock()
		run.ramp.Store(fresh)
		run.killOverride = false
		run.attempt++
		run.mu.Unlock()
		return run.change(ChangeRestarted), nil
	})
	return run, err
}

// transition makes one change to a run that has taken over the newest stored
// progress; a Change with an empty Kind means there was nothing to do.
type transition func(ctx context.Context, run *Run, now time.Time) (Change, error)

// change is the one way a rollout changes: a locked read-modify-write of the
// progress document in which the stored progress is taken over, then t makes
// its change, then the run's new record is written. A change that is made but
// cannot be stored stays in force here (and is reported as a problem): the
// ramp in memory is the better record, and the next successful write carries
// it.
func (rt *Runtime) change(ctx context.Context, run *Run, hooks Hooks, t transition) (Change, error) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.hooks = hooks
	doc := rt.doc.Load()
	if doc == nil {
		return Change{}, errors.New("rollouts have not been started")
	}
	var made Change
	// The write must not be abandoned halfway because the caller (say, an
	// admin request) went away.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
	defer cancel()
	_, _, err := doc.Update(ctx, rt, func(cur Records, rev uint64) (Records, bool, error) {
		now := rt.now()
		ch, err := t(ctx, run, now)
		if err != nil || ch.Kind == "" {
			return cur, false, err
		}
		made = ch
		rt.enforce()
		run.mu.Lock()
		rec := run.recordLocked(rev, now.UTC())
		run.rev, run.stamp = rec.Rev, rec.UpdatedAt
		run.mu.Unlock()
		return cur.with(run.flag, rec), true, nil
	})
	if made.Kind == "" {
		if err != nil && !errors.Is(err, ErrInvalidTransition) {
			rt.problem("changing a rollout", run.flag, err)
		}
		return made, err
	}
	if err != nil {
		rt.problem("storing rollout progress; it is kept in memory", run.flag, err)
	}
	rt.changed(made)
	return made, nil
}

func (rt *Runtime) enforce() {
	if rt.hooks.Enforce != nil {
		rt.hooks.Enforce()
	}
}

func (rt *Runtime) changed(ch Change) {
	if rt.hooks.Changed != nil {
		rt.hooks.Changed(ch)
	}
}

func (rt *Runtime) problem(msg, flag string, err error) {
	if rt.hooks.Problem != nil {
		rt.hooks.Problem(msg, flag, err)
	}
}

package caddymodule

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"slices"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/rollout"
)

// Defaults for rollouts.
const (
	DefaultStepDuration = caddy.Duration(10 * time.Minute)
	DefaultMinRequests  = 100
	// rolloutTickInterval is how often guardrails are folded and steps
	// checked. Observations are counted on the request path; a tick only
	// reads counters, so a short interval is cheap and keeps rollbacks quick.
	rolloutTickInterval = 250 * time.Millisecond
	rolloutsKey         = "rollouts.json"
	rolloutsLockName    = "feature_flags_rollouts"
)

// RolloutConfig is an automated ramp of one flag: the flag's rollout is capped
// at each step's percentage in turn (PostHog's own rollout hash, so a user in
// at 5 % stays in at 25 %), promoted when a step has lasted StepDuration and
// carried MinRequests requests on the new side, and rolled back or held as
// soon as a guardrail finds the new side worse than control.
type RolloutConfig struct {
	// Flag is the flag's key.
	Flag string `json:"flag"`
	// Steps are the rollout percentages, strictly increasing, each in (0, 100].
	Steps []float64 `json:"steps"`
	// StepDuration is the least time spent on each step. Default: 10m.
	StepDuration caddy.Duration `json:"step_duration,omitempty"`
	// MinRequests is the least number of requests the new side must serve
	// on a step before it is promoted. Default: 100.
	MinRequests *uint64 `json:"min_requests,omitempty"`
	// Guardrails compare the new side with control throughout the ramp.
	Guardrails []GuardrailConfig `json:"guardrails,omitempty"`
	// OnBreach is "rollback" (default: the flag is killed, with a persistent
	// kill override) or "hold" (the ramp stays where it is until an operator
	// resumes or aborts it).
	OnBreach string `json:"on_breach,omitempty"`
	// Alpha is each guardrail's false-alarm probability over the whole ramp.
	// Default: 0.05.
	Alpha float64 `json:"alpha,omitempty"`
}

// GuardrailConfig is one guardrail of a rollout.
type GuardrailConfig struct {
	// Metric is "error_rate" (5xx responses and transport errors) or
	// "latency" (requests slower than control's Quantile plus Margin).
	Metric string `json:"metric"`
	// Factor is the tolerated ratio of the new side's rate to control's: an
	// error_rate guardrail with factor 2 breaches when the new side's error
	// rate is credibly more than twice control's. Latency default: 1.
	Factor float64 `json:"factor,omitempty"`
	// Quantile of control's latency, in (0, 1), for latency guardrails.
	Quantile float64 `json:"quantile,omitempty"`
	// Margin added to control's latency quantile, for latency guardrails.
	Margin caddy.Duration `json:"margin,omitempty"`
	// MinControlSamples is how many control latencies fix the latency
	// threshold before any request is judged. Default: 200.
	MinControlSamples uint64 `json:"min_control_samples,omitempty"`
}

// rampConfig validates rc and converts it for the rollout package.
func (rc *RolloutConfig) rampConfig() (rollout.Config, error) {
	cfg := rollout.Config{Steps: rc.Steps, StepDuration: time.Duration(rc.StepDuration), Alpha: rc.Alpha}
	if rc.Flag == "" {
		return cfg, errors.New("rollout: flag key is required")
	}
	if cfg.StepDuration == 0 {
		cfg.StepDuration = time.Duration(DefaultStepDuration)
	}
	if cfg.StepDuration < 0 {
		return cfg, fmt.Errorf("rollout %s: step_duration must be positive", rc.Flag)
	}
	cfg.MinRequests = DefaultMinRequests
	if rc.MinRequests != nil {
		cfg.MinRequests = *rc.MinRequests
	}
	switch rc.OnBreach {
	case "", "rollback":
		cfg.OnBreach = rollout.Rollback
	case "hold":
		cfg.OnBreach = rollout.Hold
	default:
		return cfg, fmt.Errorf("rollout %s: on_breach must be rollback or hold, got %q", rc.Flag, rc.OnBreach)
	}
	for _, g := range rc.Guardrails {
		cfg.Guardrails = append(cfg.Guardrails, rollout.GuardrailConfig{
			Kind: g.Metric, Factor: g.Factor, Quantile: g.Quantile,
			Delta: time.Duration(g.Margin), MinControl: g.MinControlSamples,
		})
	}
	if err := cfg.Validate(); err != nil {
		return cfg, fmt.Errorf("rollout %s: %w", rc.Flag, err)
	}
	return cfg, nil
}

// rolloutRun is one flag's ramp as the engine runs it. The ramp is replaced
// when an operator restarts a rollout that has ended; the request path loads
// it per observation.
type rolloutRun struct {
	flag        string
	fingerprint string
	cfg         rollout.Config
	ramp        atomic.Pointer[rollout.Ramp]

	// The fields below are guarded by engine.rolloutMu.
	// rev is the revision of the stored record last written or adopted, and
	// stamp when it was written.
	rev   uint64
	stamp time.Time
	// attempt counts restarts of the rollout after it ended: a record of a
	// later attempt supersedes whatever an earlier one reached.
	attempt uint64
	// restored is set once stored progress has been looked for.
	restored bool
	// killOverride records that a rollback set the flag's kill override, so
	// that restarting the rollout lifts it again.
	killOverride bool
}

// ended reports whether a rollout in state s has ended.
func ended(s rollout.State) bool {
	return s == rollout.Completed || s == rollout.RolledBack || s == rollout.Aborted
}

// adoptLocked moves the run to a stored record written by another instance
// (or before a restart), and reports whether its progress changed. An end
// reached here is not undone by a record of the same attempt that has not
// ended. Callers hold engine.rolloutMu.
func (r *rolloutRun) adoptLocked(rec storedRollout) bool {
	r.rev, r.stamp = rec.Rev, rec.UpdatedAt
	ramp := r.ramp.Load()
	cur := ramp.Progress()
	if rec.Attempt == r.attempt {
		if cur.State == rec.Progress.State && cur.Step == rec.Progress.Step {
			r.killOverride = rec.KillOverride
			return false
		}
		if ended(cur.State) && !ended(rec.Progress.State) {
			return false
		}
	}
	if rec.Attempt < r.attempt {
		return false
	}
	target := ramp
	if ended(cur.State) || rec.Attempt != r.attempt {
		fresh, err := rollout.NewRamp(r.cfg, time.Now())
		if err != nil {
			return false
		}
		target = fresh
	}
	if target.Restore(rec.Progress) != nil {
		return false
	}
	r.ramp.Store(target)
	r.attempt, r.killOverride = rec.Attempt, rec.KillOverride
	return true
}

// observe counts one request served with the flag at value. "false" and a
// multivariate flag's "control" variant are the old side.
func (r *rolloutRun) observe(value string, failed bool, latency time.Duration) {
	arm := rollout.Treatment
	if value == "false" || value == "control" {
		arm = rollout.Control
	}
	r.ramp.Load().Observe(arm, failed, latency)
}

// storedRollouts is the rollout-progress document in Caddy's storage, shared
// by the instances using that storage.
type storedRollouts struct {
	Rollouts map[string]storedRollout `json:"rollouts"`
}

// storedRollout is one rollout's record. Rev grows with every write, so
// instances order changes without comparing their clocks; Attempt grows when
// an ended rollout is restarted.
type storedRollout struct {
	Fingerprint  string           `json:"fingerprint"`
	Progress     rollout.Progress `json:"progress"`
	KillOverride bool             `json:"kill_override,omitempty"`
	Rev          uint64           `json:"rev"`
	Attempt      uint64           `json:"attempt,omitempty"`
	UpdatedAt    time.Time        `json:"updated_at"`
}

// provisionRollouts validates the rollouts and prepares their runs, carrying
// over the ramps of a previous config where the rollout is unchanged.
func (a *App) provisionRollouts() error {
	a.rollouts = map[string]*rolloutRun{}
	now := time.Now()
	for _, rc := range a.Rollouts {
		if rc == nil {
			continue
		}
		cfg, err := rc.rampConfig()
		if err != nil {
			return err
		}
		if _, dup := a.rollouts[rc.Flag]; dup {
			return fmt.Errorf("rollout %s configured twice", rc.Flag)
		}
		// The fingerprint is of the normalised ramp configuration: a reload
		// that changes nothing keeps the ramp and its statistics.
		raw, _ := json.Marshal(struct {
			Flag string
			Cfg  rollout.Config
		}{rc.Flag, cfg})
		sum := sha256.Sum256(raw)
		fp := hex.EncodeToString(sum[:8])
		if old := a.engine.rolloutRun(rc.Flag); old != nil && old.fingerprint == fp {
			a.rollouts[rc.Flag] = old
			continue
		}
		ramp, err := rollout.NewRamp(cfg, now)
		if err != nil {
			return fmt.Errorf("rollout %s: %w", rc.Flag, err)
		}
		run := &rolloutRun{flag: rc.Flag, fingerprint: fp, cfg: cfg}
		run.ramp.Store(ramp)
		a.rollouts[rc.Flag] = run
	}
	return nil
}

// carryProgress restores p into ramp. Progress of a ramp that had ended is
// only carried for the same configuration: a changed configuration is a new
// attempt.
func carryProgress(ramp *rollout.Ramp, p rollout.Progress, sameConfig bool) bool {
	if ended(p.State) && !sameConfig {
		return false
	}
	return ramp.Restore(p) == nil
}

// startRollouts restores stored progress, puts the app's rollouts in force and
// starts the ticker.
func (a *App) startRollouts(ctx context.Context) {
	if len(a.rollouts) > 0 {
		a.restoreRollouts(ctx)
	}
	e := a.engine
	defs := e.store.Load()
	for flag := range a.rollouts {
		if _, ok := defs.Flag(flag); !ok && e.base != nil {
			a.logger.Warn("rollout configured for a flag the definitions lack; it takes effect when the flag appears",
				zap.String("flag", flag))
		}
	}
	e.mu.Lock()
	a.previousRollouts = e.rollouts.Load()
	previous := e.rolloutsView()
	// A rollout whose configuration changed carries on from where the
	// replaced config's ramp is now (it stops changing with this swap: the
	// ticker follows the engine's rollouts), when its step is still there.
	e.rolloutMu.Lock()
	for flag, run := range a.rollouts {
		old := previous[flag]
		if old == nil || old == run {
			continue
		}
		if carryProgress(run.ramp.Load(), old.ramp.Load().Progress(), false) {
			run.restored, run.rev, run.stamp, run.attempt, run.killOverride = true, old.rev, old.stamp, old.attempt, old.killOverride
		}
	}
	e.rolloutMu.Unlock()
	e.rollouts.Store(&a.rollouts)
	e.apply()
	e.mu.Unlock()
	for flag := range previous {
		if _, ok := a.rollouts[flag]; !ok {
			rolloutPercentage.DeleteLabelValues(flag)
		}
	}
	for _, run := range a.rollouts {
		rolloutPercentage.WithLabelValues(run.flag).Set(run.ramp.Load().Percentage())
	}
	if len(a.rollouts) > 0 {
		a.goEvery(ctx, rolloutTickInterval, a.tickRollouts)
	}
}

// stopRollouts puts the previous config's rollouts back in force when this
// app's are still the ones in force: that happens when a reload fails after
// this app started, and Caddy keeps the previous config running.
func (a *App) stopRollouts() {
	e := a.engine
	if e == nil {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.rollouts.CompareAndSwap(&a.rollouts, a.previousRollouts) {
		e.apply()
	}
}

// rolloutRun returns the run in force for flag, or nil.
func (e *engine) rolloutRun(flag string) *rolloutRun {
	return e.rolloutsView()[flag]
}

func (e *engine) rolloutsView() map[string]*rolloutRun {
	if m := e.rollouts.Load(); m != nil {
		return *m
	}
	return nil
}

// rolloutOverrides merges the operator's overrides with the caps the ramps
// impose: a ramp that rolled back or was aborted kills the flag; a ramp below
// 100 % caps the rollout at min(override, step). Callers hold e.mu.
func (e *engine) rolloutOverrides() map[string]eval.Override {
	runs := e.rolloutsView()
	if len(runs) == 0 {
		return e.overrides
	}
	merged := maps.Clone(e.overrides)
	if merged == nil {
		merged = map[string]eval.Override{}
	}
	for flag, run := range runs {
		ramp := run.ramp.Load()
		o := merged[flag]
		switch pct := ramp.Percentage(); {
		case ramp.Killed():
			o.Killed = true
		case pct < 100:
			if o.RolloutPercentage == nil || *o.RolloutPercentage > pct {
				o.RolloutPercentage = &pct
			}
		default:
			continue
		}
		merged[flag] = o
	}
	return merged
}

// tickRollouts advances every ramp in force and acts on what changed.
func (a *App) tickRollouts(ctx context.Context) {
	now := time.Now()
	for _, run := range a.engine.rolloutsView() {
		ev := run.ramp.Load().Tick(now)
		if ev.Kind == "" {
			continue
		}
		a.rolloutChanged(ctx, run, ev.Kind, ev)
	}
}

// rolloutChanged puts a ramp's new percentage in force and reports the change:
// log line, metrics, Caddy event, stored progress, and for a rollback the
// persistent kill override.
func (a *App) rolloutChanged(ctx context.Context, run *rolloutRun, kind string, ev rollout.Event) {
	e := a.engine
	ramp := run.ramp.Load()
	e.mu.Lock()
	e.apply()
	e.mu.Unlock()
	pct := ramp.Percentage()
	rolloutPercentage.WithLabelValues(run.flag).Set(pct)

	fields := []zap.Field{zap.String("flag", run.flag), zap.String("change", kind),
		zap.String("state", string(ramp.State())), zap.Float64("percentage", pct)}
	data := map[string]any{"flag": run.flag, "state": string(ramp.State()), "percentage": pct}
	if ev.Kind != "" {
		fields = append(fields, zap.Float64("from", ev.From), zap.Float64("to", ev.To))
		data["from"], data["to"] = ev.From, ev.To
	}
	if ev.Guardrail != "" {
		fields = append(fields, zap.String("guardrail", ev.Guardrail), zap.Float64("e_value", ev.EValue))
		data["guardrail"], data["e_value"] = ev.Guardrail, ev.EValue
	}
	switch kind {
	case rollout.EventRolledBack, rollout.EventHeld:
		a.logger.Warn("rollout guardrail breached", fields...)
	default:
		a.logger.Info("rollout changed", fields...)
	}

	if kind == rollout.EventRolledBack {
		rollbacksTotal.WithLabelValues(run.flag, ev.Guardrail).Inc()
		// The kill is also an ordinary override: it holds when the rollout
		// is removed from the config, and every instance sharing the
		// storage obeys it within a sync.
		if _, err := a.setOverride(ctx, run.flag, &eval.Override{Killed: true}); err != nil {
			a.logger.Error("setting the rollback's kill override; the ramp still keeps the flag off here",
				zap.String("flag", run.flag), zap.Error(err))
		} else {
			e.rolloutMu.Lock()
			run.killOverride = true
			e.rolloutMu.Unlock()
		}
	}
	a.persistRollout(ctx, run)
	if a.caddyEvents != nil {
		a.caddyEvents.Emit(a.ctx, "rollout_"+kind, data)
	}
}

// rolloutAction applies an operator's action to a flag's rollout and returns
// the run it acted on.
func (a *App) rolloutAction(ctx context.Context, flag, action string) (*rolloutRun, error) {
	e := a.engine
	run := e.rolloutRun(flag)
	if run == nil {
		return nil, errNoRollout
	}
	now := time.Now()
	ramp := run.ramp.Load()
	var err error
	kind := action + "d"
	switch action {
	case "pause":
		err = ramp.Pause(now)
	case "promote":
		if err = ramp.Promote(now); err == nil && ramp.State() == rollout.Completed {
			kind = rollout.EventCompleted
		}
	case "abort":
		err = ramp.Abort(now)
		kind = "aborted"
	case "resume":
		if state := ramp.State(); state != rollout.RolledBack && state != rollout.Aborted {
			err = ramp.Resume(now)
			break
		}
		// An ended ramp starts over from its first step, as a new attempt.
		// The kill a rollback set is lifted first, as the operator asked to
		// try again: if that fails, nothing has changed.
		e.rolloutMu.Lock()
		lift := run.killOverride
		e.rolloutMu.Unlock()
		if lift {
			if o, ok := e.overridesSnapshot()[flag]; ok && o == (eval.Override{Killed: true}) {
				if _, err := a.setOverride(ctx, flag, nil); err != nil {
					return nil, fmt.Errorf("lifting the rollback's kill override: %w", err)
				}
			}
		}
		fresh, err := rollout.NewRamp(run.cfg, now)
		if err != nil {
			return nil, err
		}
		e.rolloutMu.Lock()
		run.ramp.Store(fresh)
		run.killOverride = false
		run.attempt++
		e.rolloutMu.Unlock()
		kind = "restarted"
	default:
		return nil, fmt.Errorf("%w %q", errUnknownAction, action)
	}
	if err != nil {
		return nil, err
	}
	a.rolloutChanged(ctx, run, kind, rollout.Event{})
	return run, nil
}

var (
	errNoRollout       = errors.New("no rollout is configured for this flag")
	errUnknownAction   = errors.New("unknown rollout action")
	errCorruptRollouts = errors.New("stored rollout progress is not valid JSON")
)

// rolloutStatus is a rollout as the admin API shows it.
type rolloutStatus struct {
	Flag string `json:"flag"`
	rollout.Status
	OnBreach     string     `json:"on_breach"`
	StepDuration string     `json:"step_duration"`
	MinRequests  uint64     `json:"min_requests"`
	NextStepAt   *time.Time `json:"next_step_at,omitempty"`
	KillOverride bool       `json:"kill_override,omitempty"`
	Stored       *time.Time `json:"stored_at,omitempty"`
}

func (a *App) rolloutStatus(run *rolloutRun) rolloutStatus {
	st := rolloutStatus{Flag: run.flag, Status: run.ramp.Load().Status(), OnBreach: run.cfg.OnBreach.String(),
		StepDuration: run.cfg.StepDuration.String(), MinRequests: run.cfg.MinRequests}
	if st.State == rollout.Running {
		t := st.StepStartedAt.Add(run.cfg.StepDuration)
		st.NextStepAt = &t
	}
	a.engine.rolloutMu.Lock()
	st.KillOverride = run.killOverride
	if !run.stamp.IsZero() {
		t := run.stamp
		st.Stored = &t
	}
	a.engine.rolloutMu.Unlock()
	return st
}

// rolloutStatuses lists every rollout in force, by flag.
func (a *App) rolloutStatuses() []rolloutStatus {
	runs := a.engine.rolloutsView()
	keys := slices.Sorted(maps.Keys(runs))
	out := make([]rolloutStatus, 0, len(keys))
	for _, k := range keys {
		out = append(out, a.rolloutStatus(runs[k]))
	}
	return out
}

// persistRollout writes run's progress to storage, under the storage lock so
// that instances sharing it do not overwrite each other's other rollouts. The
// progress is read inside the lock, so the record is this instance's latest
// whatever order concurrent changes arrive in. A change another instance made
// since this one last looked, of a later attempt or ending the rollout, wins
// over a change made here that does neither: it is adopted, not overwritten.
func (a *App) persistRollout(ctx context.Context, run *rolloutRun) {
	e := a.engine
	if a.storage == nil {
		e.rolloutMu.Lock()
		run.rev, run.stamp = run.rev+1, time.Now().UTC()
		e.rolloutMu.Unlock()
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
	defer cancel()
	adopted := false
	err := a.withStorageLock(ctx, rolloutsLockName, func() error {
		doc, err := a.readRollouts(ctx)
		if errors.Is(err, errCorruptRollouts) {
			// Unreadable progress would block every later write; the
			// ramps in memory are the better record.
			a.logger.Warn("replacing unreadable rollout progress in storage", zap.Error(err))
		} else if err != nil {
			return err
		}
		e.rolloutMu.Lock()
		defer e.rolloutMu.Unlock()
		stored, ok := doc.Rollouts[run.flag]
		if ok && stored.Fingerprint == run.fingerprint && stored.Rev > run.rev {
			ours := run.ramp.Load().Progress()
			if stored.Attempt > run.attempt ||
				(stored.Attempt == run.attempt && ended(stored.Progress.State) && !ended(ours.State)) {
				adopted = run.adoptLocked(stored)
				return nil
			}
		}
		rec := storedRollout{Fingerprint: run.fingerprint, Progress: run.ramp.Load().Progress(),
			KillOverride: run.killOverride, Rev: max(stored.Rev, run.rev) + 1, Attempt: run.attempt,
			UpdatedAt: time.Now().UTC()}
		doc.Rollouts[run.flag] = rec
		data, err := json.Marshal(doc)
		if err != nil {
			return err
		}
		if err := a.storage.Store(ctx, a.storageKey(rolloutsKey), data); err != nil {
			return err
		}
		run.rev, run.stamp = rec.Rev, rec.UpdatedAt
		return nil
	})
	if err != nil {
		a.logger.Error("storing rollout progress; it is kept in memory", zap.String("flag", run.flag), zap.Error(err))
	}
	if adopted {
		a.rolloutsAdopted(run)
	}
}

// rolloutsAdopted puts progress adopted from storage in force.
func (a *App) rolloutsAdopted(runs ...*rolloutRun) {
	e := a.engine
	e.mu.Lock()
	e.apply()
	e.mu.Unlock()
	for _, run := range runs {
		ramp := run.ramp.Load()
		p := ramp.Progress()
		rolloutPercentage.WithLabelValues(run.flag).Set(ramp.Percentage())
		a.logger.Info("rollout progress adopted from storage", zap.String("flag", run.flag),
			zap.String("state", string(p.State)), zap.Int("step", p.Step+1))
	}
}

func (a *App) readRollouts(ctx context.Context) (storedRollouts, error) {
	doc := storedRollouts{Rollouts: map[string]storedRollout{}}
	data, err := a.storage.Load(ctx, a.storageKey(rolloutsKey))
	if errors.Is(err, fs.ErrNotExist) {
		return doc, nil
	}
	if err != nil {
		return doc, fmt.Errorf("reading rollout progress: %w", err)
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		return storedRollouts{Rollouts: map[string]storedRollout{}}, fmt.Errorf("%w: %v", errCorruptRollouts, err)
	}
	if doc.Rollouts == nil {
		doc.Rollouts = map[string]storedRollout{}
	}
	return doc, nil
}

// restoreRollouts puts the app's fresh runs where the stored progress says,
// so a restart carries on a ramp instead of starting it over.
func (a *App) restoreRollouts(ctx context.Context) {
	if a.storage == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	doc, err := a.readRollouts(ctx)
	if err != nil {
		a.logger.Warn("rollout progress in storage ignored; rollouts start from their first step", zap.Error(err))
		return
	}
	e := a.engine
	e.rolloutMu.Lock()
	defer e.rolloutMu.Unlock()
	for flag, run := range a.rollouts {
		if run.restored {
			continue
		}
		run.restored = true
		rec, ok := doc.Rollouts[flag]
		if !ok {
			continue
		}
		if carryProgress(run.ramp.Load(), rec.Progress, rec.Fingerprint == run.fingerprint) {
			run.rev, run.stamp, run.attempt, run.killOverride = rec.Rev, rec.UpdatedAt, rec.Attempt, rec.KillOverride
			a.logger.Info("rollout progress restored", zap.String("flag", flag),
				zap.String("state", string(rec.Progress.State)), zap.Int("step", rec.Progress.Step+1))
		} else {
			a.logger.Info("stored rollout progress does not fit the configured rollout; it starts from its first step",
				zap.String("flag", flag))
		}
	}
}

// syncRollouts adopts progress another instance sharing the storage made: a
// promotion, a rollback or an operator's action there moves this instance's
// ramp to the same state and step.
func (a *App) syncRollouts(ctx context.Context) {
	runs := a.engine.rolloutsView()
	if a.storage == nil || len(runs) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	info, err := a.storage.Stat(ctx, a.storageKey(rolloutsKey))
	if err != nil {
		return // not written yet, or unreadable: the next sync tries again
	}
	e := a.engine
	e.rolloutMu.Lock()
	seen := e.rolloutsStamp
	e.rolloutMu.Unlock()
	if info.Modified.Equal(seen) {
		return
	}
	doc, err := a.readRollouts(ctx)
	e.rolloutMu.Lock()
	// Remembered even when unreadable, so a bad version is reported once.
	e.rolloutsStamp = info.Modified
	e.rolloutMu.Unlock()
	if err != nil {
		a.logger.Warn("syncing rollout progress from storage", zap.Error(err))
		return
	}
	var adopted []*rolloutRun
	e.rolloutMu.Lock()
	for flag, run := range runs {
		rec, ok := doc.Rollouts[flag]
		if ok && rec.Fingerprint == run.fingerprint && rec.Rev > run.rev && run.adoptLocked(rec) {
			adopted = append(adopted, run)
		}
	}
	e.rolloutMu.Unlock()
	if len(adopted) > 0 {
		a.rolloutsAdopted(adopted...)
	}
}

package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"math"
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
	// Alpha is each guardrail's false-alarm probability over the whole ramp,
	// and the sample-ratio check's. Default: 0.05.
	Alpha float64 `json:"alpha,omitempty"`
	// DryRun runs the ramp without enforcing it: steps, guardrails and the
	// sample-ratio check are evaluated and reported as usual (status,
	// metrics, events and logs say "dry run"), but requests are routed and
	// headed as the flag's own definition says, never capped by the step,
	// and a breach kills nothing.
	DryRun bool `json:"dry_run,omitempty"`
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
	cfg := rollout.Config{Steps: rc.Steps, StepDuration: time.Duration(rc.StepDuration), Alpha: rc.Alpha, DryRun: rc.DryRun}
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

// provisionRollouts validates the rollouts and prepares their set, reusing
// the runs in force whose rollout is unchanged (a reload then keeps the ramp
// and its statistics).
func (a *App) provisionRollouts() error {
	configs := make([]rollout.FlagConfig, 0, len(a.Rollouts))
	for _, rc := range a.Rollouts {
		if rc == nil {
			continue
		}
		cfg, err := rc.rampConfig()
		if err != nil {
			return err
		}
		configs = append(configs, rollout.FlagConfig{Flag: rc.Flag, Config: cfg})
	}
	set, err := a.engine.rollouts.Prepare(configs)
	if err != nil {
		return err
	}
	a.rollouts = set
	return nil
}

// startRollouts puts the app's rollouts in force, where their stored progress
// (or the replaced config's ramps) says, and starts the ticker.
func (a *App) startRollouts(ctx context.Context) {
	e := a.engine
	previous := e.rollouts.Start(ctx, a.rollouts, a.docs.rollouts, a.rolloutHooks())
	e.apply()
	a.publishRolloutGauges(previous)
	if a.rollouts.Len() > 0 {
		a.goEvery(ctx, rolloutTickInterval, func(ctx context.Context) { e.rollouts.Tick(ctx, a.rolloutHooks()) })
	}
}

// stopRollouts tells the runtime this config stopped: when its rollouts are
// still in force (a reload that failed after this app started, so Caddy keeps
// the previous config running), the previous config's come back.
func (a *App) stopRollouts() {
	if a.rollouts == nil || !a.engine.rollouts.Stop(a.rollouts) {
		return
	}
	a.engine.apply()
	a.publishRolloutGauges(a.rollouts)
}

// publishRolloutGauges sets the percentage gauge of every rollout in force and
// removes those of the replaced set's flags that are gone.
func (a *App) publishRolloutGauges(replaced *rollout.Set) {
	inForce := a.engine.rollouts.InForce()
	for _, run := range replaced.Runs() {
		if inForce.Run(run.Flag()) == nil {
			rolloutPercentage.DeleteLabelValues(run.Flag())
		}
	}
	for _, run := range replaced.Runs() {
		if inForce.Run(run.Flag()) == nil {
			rolloutDryRun.DeleteLabelValues(run.Flag())
			rolloutSampleRatioMismatch.DeleteLabelValues(run.Flag())
		}
	}
	for _, run := range inForce.Runs() {
		publishRampGauges(run)
	}
}

// publishRampGauges sets a rollout's gauges from its ramp.
func publishRampGauges(run *rollout.Run) {
	ramp := run.Ramp()
	rolloutPercentage.WithLabelValues(run.Flag()).Set(ramp.Percentage())
	rolloutDryRun.WithLabelValues(run.Flag()).Set(boolGauge(ramp.DryRun()))
	rolloutSampleRatioMismatch.WithLabelValues(run.Flag()).Set(boolGauge(ramp.Status().SampleRatio.Mismatch))
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// treatmentShare is the share of matching users the flag, as defs define it,
// puts on the new side of a rollout; NaN when no single share holds.
func treatmentShare(defs *eval.Definitions, flag string) float64 {
	if f, ok := defs.Flag(flag); ok {
		if q, ok := f.TreatmentShare(); ok {
			return q
		}
	}
	return math.NaN()
}

// matchedByHash reports whether an answer was decided by a matching
// condition's rollout hash: the users the sample-ratio check counts. An
// undecided answer (served as control) and a user no condition matched say
// nothing about the split.
func matchedByHash(reason eval.Reason) bool {
	return reason == eval.ReasonConditionMatch || reason == eval.ReasonOutOfRollout
}

// rolloutHooks connect the rollout runtime to this config: overrides,
// logs, metrics and Caddy events.
func (a *App) rolloutHooks() rollout.Hooks {
	killed := eval.Override{Killed: true}
	return rollout.Hooks{
		Enforce: a.engine.apply,
		Changed: a.rolloutChanged,
		Kill: func(ctx context.Context, flag string) error {
			ch, err := a.setOverride(ctx, flag, &killed, nil)
			if err == nil {
				a.overrideChanged(ch, "rollback")
			}
			return err
		},
		Lift: func(ctx context.Context, flag string) error {
			ch, err := a.setOverride(ctx, flag, nil, &killed)
			switch {
			case errors.Is(err, errNoOverride):
				return nil // an operator deleted it already
			case err == nil && ch.revision != 0:
				a.overrideChanged(ch, "rollout restart")
			}
			return err
		},
		Problem: func(msg, flag string, err error) {
			a.logger.Error(msg, zap.String("flag", flag), zap.Error(err))
		},
	}
}

// rolloutChanged reports a rollout's change (which Enforce put in force):
// log line, metrics and Caddy event.
func (a *App) rolloutChanged(ch rollout.Change) {
	if run := a.engine.rollouts.InForce().Run(ch.Flag); run != nil {
		publishRampGauges(run)
	} else {
		rolloutPercentage.WithLabelValues(ch.Flag).Set(ch.Percentage)
	}
	fields := []zap.Field{zap.String("flag", ch.Flag), zap.String("change", ch.Kind),
		zap.String("state", string(ch.State)), zap.Float64("percentage", ch.Percentage)}
	data := map[string]any{"flag": ch.Flag, "state": string(ch.State), "percentage": ch.Percentage}
	// A dry run says so everywhere: what it reports is what it would have
	// done, and none of it is enforced.
	dry := ""
	if ch.DryRun {
		fields = append(fields, zap.Bool("dry_run", true))
		data["dry_run"] = true
		dry = " (dry run)"
	}
	if ch.From != ch.To {
		fields = append(fields, zap.Float64("from", ch.From), zap.Float64("to", ch.To))
		data["from"], data["to"] = ch.From, ch.To
	}
	if ch.Guardrail != "" {
		fields = append(fields, zap.String("guardrail", ch.Guardrail), zap.Float64("e_value", ch.EValue))
		data["guardrail"], data["e_value"] = ch.Guardrail, ch.EValue
	}
	switch {
	case ch.Guardrail == rollout.SampleRatioGuard:
		a.logger.Warn("rollout sample ratio mismatch: the split of users between the sides is not the configured one; the ramp holds"+dry, fields...)
	case ch.Kind == rollout.EventRolledBack || ch.Kind == rollout.EventHeld:
		a.logger.Warn("rollout guardrail breached"+dry, fields...)
	case ch.Kind == rollout.ChangeAdopted:
		a.logger.Info("rollout progress adopted from storage"+dry, append(fields, zap.Int("step", ch.Step+1))...)
		return // the instance that made the change reported it
	default:
		a.logger.Info("rollout changed"+dry, fields...)
	}
	if ch.Guardrail != "" {
		breachesTotal.WithLabelValues(ch.Flag, ch.Guardrail, ch.Kind, boolLabel(ch.DryRun)).Inc()
	}
	if ch.Kind == rollout.EventRolledBack && !ch.DryRun {
		rollbacksTotal.WithLabelValues(ch.Flag, ch.Guardrail).Inc()
	}
	a.emit("rollout_"+ch.Kind, data)
}

// emit sends a Caddy event, for any events handler to act on.
func (a *App) emit(name string, data map[string]any) {
	if a.caddyEvents != nil {
		a.caddyEvents.Emit(a.ctx, name, data)
	}
}

// rolloutStatus is a rollout as the admin API shows it.
type rolloutStatus struct {
	Flag string `json:"flag"`
	rollout.RunStatus
	OnBreach     string     `json:"on_breach"`
	StepDuration string     `json:"step_duration"`
	MinRequests  uint64     `json:"min_requests"`
	NextStepAt   *time.Time `json:"next_step_at,omitempty"`
}

func rolloutStatusOf(run *rollout.Run) rolloutStatus {
	cfg := run.Config()
	st := rolloutStatus{Flag: run.Flag(), RunStatus: run.Status(), OnBreach: cfg.OnBreach.String(),
		StepDuration: cfg.StepDuration.String(), MinRequests: cfg.MinRequests}
	if st.State == rollout.Running {
		t := st.StepStartedAt.Add(cfg.StepDuration)
		st.NextStepAt = &t
	}
	return st
}

// rolloutStatuses lists every rollout in force, by flag.
func (a *App) rolloutStatuses() []rolloutStatus {
	runs := a.engine.rollouts.InForce().Runs()
	out := make([]rolloutStatus, 0, len(runs))
	for _, run := range runs {
		out = append(out, rolloutStatusOf(run))
	}
	return out
}

func boolLabel(b bool) string {
	if b {
		return "true"
	}
	return "false"
}

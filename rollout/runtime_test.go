package rollout

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flagsplit/flagsplit/storedoc"
	"github.com/flagsplit/flagsplit/storedoc/storedoctest"
)

// fakeClock is the clock of one or several runtimes; only the test moves it.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

const progressKey = "feature_flags/local/rollouts.json"

// instance is one proxy's runtime over a storage shared with others.
type instance struct {
	t       *testing.T
	store   storedoc.Storage
	hooks   Hooks
	rt      *Runtime
	set     *Set
	clock   *fakeClock
	mu      sync.Mutex
	changes []Change
	kills   []string
	lifts   []string
	errs    []string
	// calls is the order the hooks were called in.
	calls []string
}

func runtimeConfig() Config {
	return Config{
		Steps:        []float64{10, 50, 100},
		StepDuration: time.Minute,
		MinRequests:  20,
		Guardrails:   []GuardrailConfig{{Kind: KindErrorRate, Factor: 2}},
		OnBreach:     Rollback,
	}
}

func newInstance(t *testing.T, st storedoc.Storage, clock *fakeClock, cfg Config) *instance {
	t.Helper()
	in := &instance{t: t, clock: clock, store: st}
	in.rt = NewRuntime(clock.Now)
	in.hooks = Hooks{
		Enforce: func() { in.mu.Lock(); in.calls = append(in.calls, "enforce"); in.mu.Unlock() },
		Changed: func(ch Change) {
			in.mu.Lock()
			in.changes = append(in.changes, ch)
			in.calls = append(in.calls, "changed:"+ch.Kind)
			in.mu.Unlock()
		},
		Kill: func(_ context.Context, flag string) error {
			in.mu.Lock()
			in.kills = append(in.kills, flag)
			in.calls = append(in.calls, "kill")
			in.mu.Unlock()
			return nil
		},
		Lift: func(_ context.Context, flag string) error {
			in.mu.Lock()
			in.lifts = append(in.lifts, flag)
			in.mu.Unlock()
			return nil
		},
		Problem: func(msg, flag string, err error) {
			in.mu.Lock()
			in.errs = append(in.errs, msg+": "+err.Error())
			in.mu.Unlock()
		},
	}
	in.start(cfg, st)
	return in
}

// start puts a configuration with one rollout of "checkout" in force, as a
// config load does.
func (in *instance) start(cfg Config, st storedoc.Storage) {
	in.t.Helper()
	set, err := in.rt.Prepare([]FlagConfig{{Flag: "checkout", Config: cfg}})
	if err != nil {
		in.t.Fatal(err)
	}
	in.rt.Start(context.Background(), set, storedoc.New[Records](st, progressKey, "rollouts", in.clock.Now), in.hooks)
	in.set = set
}

func (in *instance) sync() { in.rt.Sync(context.Background(), in.hooks) }

func (in *instance) tick() { in.rt.Tick(context.Background(), in.hooks) }

func (in *instance) run() *Run { return in.rt.InForce().Run("checkout") }

func (in *instance) progress() Progress { return in.run().Ramp().Progress() }

func (in *instance) act(action string) error {
	_, err := in.rt.Act(context.Background(), "checkout", action, in.hooks)
	return err
}

func (in *instance) lastChange() Change {
	in.mu.Lock()
	defer in.mu.Unlock()
	if len(in.changes) == 0 {
		return Change{}
	}
	return in.changes[len(in.changes)-1]
}

func (in *instance) want(state State, step int) {
	in.t.Helper()
	if p := in.progress(); p.State != state || p.Step != step {
		in.t.Fatalf("at %s step %d, want %s step %d", p.State, p.Step, state, step)
	}
}

// serve reports n requests per side to the run's ramp.
func (in *instance) serve(n int, treatmentFails bool) {
	for i := 0; i < n; i++ {
		in.run().Observe("false", false, time.Millisecond)
		in.run().Observe("true", treatmentFails, time.Millisecond)
	}
}

func twoInstances(t *testing.T) (a, b *instance, st *storedoctest.Memory) {
	st = storedoctest.NewMemory()
	clock := &fakeClock{now: time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)}
	return newInstance(t, st, clock, runtimeConfig()), newInstance(t, st, clock, runtimeConfig()), st
}

func TestArmOf(t *testing.T) {
	for value, want := range map[string]Arm{"false": Control, "control": Control, "true": Treatment, "test": Treatment, "variant-b": Treatment} {
		if got := ArmOf(value); got != want {
			t.Errorf("ArmOf(%q) = %v, want %v", value, got, want)
		}
	}
}

func TestAnOperatorsActionIsSharedAndFollowed(t *testing.T) {
	a, b, _ := twoInstances(t)
	if err := a.act(ActionPromote); err != nil {
		t.Fatal(err)
	}
	a.want(Running, 1)
	if ch := a.lastChange(); ch.Kind != EventPromoted || ch.From != 10 || ch.To != 50 {
		t.Errorf("change reported: %+v", ch)
	}
	b.want(Running, 0) // not synced yet
	b.sync()
	b.want(Running, 1)
	if ch := b.lastChange(); ch.Kind != ChangeAdopted || ch.Percentage != 50 {
		t.Errorf("b reported %+v", ch)
	}
	if got := b.run().Ramp().Percentage(); got != 50 {
		t.Errorf("b enforces %v %%", got)
	}
}

// An operator acting on an instance that has not yet synced acts on the
// newest shared progress: after another instance's abort, a promotion is
// refused, not made and then silently reverted.
func TestAnActionAppliesToTheNewestSharedProgress(t *testing.T) {
	a, b, _ := twoInstances(t)
	if err := b.act(ActionAbort); err != nil {
		t.Fatal(err)
	}
	err := a.act(ActionPromote)
	if !errors.Is(err, ErrInvalidTransition) {
		t.Fatalf("promote after another instance's abort: %v, want an invalid transition", err)
	}
	a.want(Aborted, 0)
	if !a.run().Ramp().Cap().Killed {
		t.Error("a does not keep the flag off after taking over the abort")
	}
}

// An end reached on one instance is never undone by a promotion another
// instance makes on the traffic it saw before it learnt of the end.
func TestAnEndIsNeverUndoneByAConcurrentPromotion(t *testing.T) {
	a, b, _ := twoInstances(t)
	// b's share of the new side fails; a's is healthy and its step is due.
	b.serve(400, true)
	a.serve(400, false)
	a.clock.Advance(2 * time.Minute)
	b.tick()
	b.want(RolledBack, 0)
	if len(b.kills) != 1 || !b.run().Status().KillOverride {
		t.Fatalf("rollback on b: kills %v, status %+v", b.kills, b.run().Status())
	}
	// The rollback is enforced before anything is written to storage (the
	// kill override, the record), and reported after.
	if got := strings.Join(b.calls, " "); got != "enforce kill enforce changed:rolled_back" {
		t.Errorf("hook order on b: %s", got)
	}
	a.tick() // due to promote, but the stored record has ended
	a.want(RolledBack, 0)
	if ch := a.lastChange(); ch.Kind != ChangeAdopted {
		t.Errorf("a reported %+v, want the adoption of the rollback", ch)
	}
	if len(a.kills) != 0 {
		t.Errorf("a set the kill override too: %v", a.kills)
	}
	stored, _, err := storedoc.New[Records](a.store, progressKey, "rollouts", nil).Read(context.Background())
	if rec := stored.Value.Rollouts["checkout"]; err != nil || rec.Progress.State != RolledBack || !rec.KillOverride {
		t.Errorf("stored record %+v (%v)", rec, err)
	}
}

// A promotion made elsewhere is followed without discarding the evidence
// gathered here: a breach this instance's traffic shows still rolls back.
func TestFollowingAPromotionKeepsTheGuardrailEvidence(t *testing.T) {
	a, b, _ := twoInstances(t)
	b.serve(400, true) // b's traffic breaches, b has not ticked yet
	if err := a.act(ActionPromote); err != nil {
		t.Fatal(err)
	}
	b.tick()
	b.want(RolledBack, 1)
	if ch := b.lastChange(); ch.Kind != EventRolledBack || ch.From != 50 || ch.To != 0 {
		t.Errorf("b reported %+v", ch)
	}
	a.sync()
	a.want(RolledBack, 1)
}

// Operators' intent outranks automatic promotion: an instance whose step is
// due takes over another's pause instead of promoting over it.
func TestAPausedRolloutIsNotPromotedByAnotherInstance(t *testing.T) {
	a, b, _ := twoInstances(t)
	if err := b.act(ActionPause); err != nil {
		t.Fatal(err)
	}
	a.serve(100, false)
	a.clock.Advance(2 * time.Minute)
	a.tick()
	a.want(Paused, 0)
	b.sync()
	b.want(Paused, 0)
}

// Stored progress older than what this instance has seen never comes back,
// however late it is offered (a read that was slow, say).
func TestOlderProgressIsNeverTakenOver(t *testing.T) {
	a, _, _ := twoInstances(t)
	doc := storedoc.New[Records](a.store, progressKey, "rollouts", nil)
	if err := a.act(ActionPromote); err != nil {
		t.Fatal(err)
	}
	older, _, err := doc.Read(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := a.act(ActionPromote); err != nil {
		t.Fatal(err)
	}
	a.rt.mu.Lock()
	taken := a.rt.Offer(older)
	a.rt.mu.Unlock()
	if taken {
		t.Error("an older version was taken over")
	}
	a.want(Running, 2)
}

func TestStartingOverAfterARollback(t *testing.T) {
	a, b, _ := twoInstances(t)
	a.serve(400, true)
	a.tick()
	a.want(RolledBack, 0)
	b.sync()
	b.want(RolledBack, 0)
	if err := a.act(ActionResume); err != nil {
		t.Fatal(err)
	}
	a.want(Running, 0)
	if len(a.lifts) != 1 || a.run().Status().Attempt != 1 || a.run().Status().KillOverride {
		t.Errorf("restart: lifts %v, status %+v", a.lifts, a.run().Status())
	}
	if ch := a.lastChange(); ch.Kind != ChangeRestarted || ch.Percentage != 10 {
		t.Errorf("a reported %+v", ch)
	}
	// b follows the new attempt out of its ended state, with fresh
	// statistics.
	b.sync()
	b.want(Running, 0)
	if st := b.run().Status(); st.Attempt != 1 || st.Total.Treatment.Requests != 0 {
		t.Errorf("b after the restart: %+v", st)
	}
	// Resuming a running rollout is not a restart.
	if err := a.act(ActionResume); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("resume while running: %v", err)
	}
}

func TestALiftThatFailsChangesNothing(t *testing.T) {
	st := storedoctest.NewMemory()
	clock := &fakeClock{now: time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)}
	a := newInstance(t, st, clock, runtimeConfig())
	a.hooks.Lift = func(context.Context, string) error { return errors.New("storage down") }
	a.serve(400, true)
	a.tick()
	err := a.act(ActionResume)
	if err == nil || !strings.Contains(err.Error(), "lifting") {
		t.Fatalf("resume with a failing lift: %v", err)
	}
	a.want(RolledBack, 0)
}

func TestARestartCarriesOnWhereTheStoredProgressIs(t *testing.T) {
	a, _, st := twoInstances(t)
	for _, action := range []string{ActionPromote, ActionPause} {
		if err := a.act(action); err != nil {
			t.Fatal(err)
		}
	}
	restarted := newInstance(t, st, a.clock, runtimeConfig())
	restarted.want(Paused, 1)
	// A changed configuration whose step at the stored position has the
	// same percentage carries on there.
	changed := runtimeConfig()
	changed.MinRequests = 50
	carried := newInstance(t, st, a.clock, changed)
	carried.want(Paused, 1)
	// One whose step there differs starts from its first step.
	other := runtimeConfig()
	other.Steps = []float64{10, 40, 100}
	fresh := newInstance(t, st, a.clock, other)
	fresh.want(Running, 0)
	// An ended rollout is carried only for the same configuration.
	if err := a.act(ActionAbort); err != nil {
		t.Fatal(err)
	}
	newInstance(t, st, a.clock, runtimeConfig()).want(Aborted, 1)
	newInstance(t, st, a.clock, changed).want(Running, 0)
}

func TestAReloadKeepsUnchangedRunsAndAFailedOnePutsThePreviousBack(t *testing.T) {
	st := storedoctest.NewMemory()
	clock := &fakeClock{now: time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)}
	a := newInstance(t, st, clock, runtimeConfig())
	first := a.set
	a.serve(5, false)
	if err := a.act(ActionPromote); err != nil {
		t.Fatal(err)
	}
	// Same configuration: the same run, statistics and all.
	same, err := a.rt.Prepare([]FlagConfig{{Flag: "checkout", Config: runtimeConfig()}})
	if err != nil || same.Run("checkout") != first.Run("checkout") {
		t.Fatalf("an unchanged rollout got a new run (%v)", err)
	}
	// A changed configuration starts where the replaced run is.
	changed := runtimeConfig()
	changed.MinRequests = 99
	next, err := a.rt.Prepare([]FlagConfig{{Flag: "checkout", Config: changed}})
	if err != nil {
		t.Fatal(err)
	}
	a.rt.Start(context.Background(), next, storedoc.New[Records](st, progressKey, "rollouts", clock.Now), a.hooks)
	a.want(Running, 1)
	// The reload fails after starting: the previous rollouts come back.
	if !a.rt.Stop(next) || a.rt.InForce() != first {
		t.Fatal("a failed reload left its rollouts in force")
	}
	// A reload that succeeds: the old configuration stops, nothing moves.
	a.rt.Start(context.Background(), next, storedoc.New[Records](st, progressKey, "rollouts", clock.Now), a.hooks)
	if a.rt.Stop(first) || a.rt.InForce() != next || next.previous.Load() != nil {
		t.Fatal("stopping the replaced configuration disturbed the new one")
	}
	if _, err := a.rt.Prepare([]FlagConfig{{Flag: "x", Config: runtimeConfig()}, {Flag: "x", Config: runtimeConfig()}}); err == nil {
		t.Error("a flag configured twice was accepted")
	}
}

func TestUnreadableStoredProgressIsReplacedAndKeptAside(t *testing.T) {
	st := storedoctest.NewMemory()
	garbage := []byte(`{"rollouts": {"checkout": {"progress": `)
	if err := st.Store(context.Background(), progressKey, garbage); err != nil {
		t.Fatal(err)
	}
	clock := &fakeClock{now: time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)}
	a := newInstance(t, st, clock, runtimeConfig())
	a.want(Running, 0)
	if len(a.errs) != 1 || !strings.Contains(a.errs[0], "ignored") {
		t.Errorf("problems reported: %v", a.errs)
	}
	if err := a.act(ActionPromote); err != nil {
		t.Fatal(err)
	}
	if string(st.Get(progressKey+".unreadable")) != string(garbage) {
		t.Errorf("the unreadable progress was not kept aside")
	}
	if newInstance(t, st, clock, runtimeConfig()).want(Running, 1); len(a.errs) != 1 {
		t.Errorf("problems: %v", a.errs)
	}
}

// failingStores is a storage whose writes fail.
type failingStores struct{ *storedoctest.Memory }

func (failingStores) Store(context.Context, string, []byte) error { return errors.New("disk full") }

// flakyStores is a storage whose writes fail while failing is set.
type flakyStores struct {
	*storedoctest.Memory
	failing *bool
}

func (f flakyStores) Store(ctx context.Context, key string, value []byte) error {
	if *f.failing {
		return errors.New("disk full")
	}
	return f.Memory.Store(ctx, key, value)
}

// An instance whose rollback could not be stored keeps it, even when another
// instance, which never learnt of it, promotes the shared record meanwhile.
func TestAnEndIsNeverUndoneByAPromotionMadeWithoutIt(t *testing.T) {
	st := storedoctest.NewMemory()
	clock := &fakeClock{now: time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)}
	failing := false
	a := newInstance(t, st, clock, runtimeConfig())
	b := newInstance(t, flakyStores{st, &failing}, clock, runtimeConfig())
	failing = true
	b.serve(400, true)
	b.tick()
	b.want(RolledBack, 0)
	failing = false
	clock.Advance(time.Second) // a writes later, at a higher revision
	if err := a.act(ActionPromote); err != nil {
		t.Fatal(err)
	}
	b.sync()
	b.want(RolledBack, 0)
	if !b.run().Ramp().Cap().Killed {
		t.Error("b lets the flag through again")
	}
}

func TestAChangeThatCannotBeStoredStaysInForceHere(t *testing.T) {
	clock := &fakeClock{now: time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)}
	a := newInstance(t, failingStores{storedoctest.NewMemory()}, clock, runtimeConfig())
	if err := a.act(ActionPromote); err != nil {
		t.Fatalf("promote: %v", err)
	}
	a.want(Running, 1)
	if len(a.errs) != 1 || !strings.Contains(a.errs[0], "kept in memory") || !strings.Contains(a.errs[0], "disk full") {
		t.Errorf("problems: %v", a.errs)
	}
	if a.lastChange().Kind != EventPromoted {
		t.Errorf("change: %+v", a.lastChange())
	}
}

func TestActRejectsUnknownFlagsAndActions(t *testing.T) {
	a, _, _ := twoInstances(t)
	if _, err := a.rt.Act(context.Background(), "nope", ActionPause, a.hooks); !errors.Is(err, ErrNoRollout) {
		t.Errorf("unknown flag: %v", err)
	}
	if _, err := a.rt.Act(context.Background(), "checkout", "explode", a.hooks); !errors.Is(err, ErrUnknownAction) {
		t.Errorf("unknown action: %v", err)
	}
}

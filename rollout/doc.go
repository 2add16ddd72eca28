// Package rollout runs automated, step-by-step rollouts ("ramps") of a
// feature flag, guarded by anytime-valid sequential tests that roll the flag
// back, or hold it, on their own when the new side misbehaves.
//
// A proxy that routes by a flag sees every response of both sides: control
// (users still on the old side) and treatment (users moved to the new side).
// It reports each one to [Ramp.Observe], which only touches atomic counters,
// and calls [Ramp.Tick] a few times a second. Tick folds what was observed
// since the previous tick into the guardrails and moves the ramp along: to the next step
// once the current one has lasted long enough and carried enough treatment
// traffic, or to RolledBack or Held as soon as a guardrail is breached. The
// proxy enforces [Ramp.Percentage] and forces the flag off while [Ramp.Killed].
//
// Guardrails are mixture sequential probability ratio tests ([Test]) on which
// arm each bad event (an error, or a request slower than a threshold) came
// from, given how much traffic each arm carried. They can be checked after
// every batch without inflating the false-alarm rate: the probability that a
// guardrail ever fires while treatment is no worse than its allowance is at
// most alpha. A guardrail that has seen too little data simply does not fire;
// it never blocks a step.
//
// A [Runtime] runs the rollouts of one instance across configuration reloads
// and shares their progress with the other instances using the same storage,
// through a document of package storedoc. Every change, whether a tick's
// promotion or rollback or an operator's action, is one locked
// read-modify-write of that document that first takes over the stored
// progress where it supersedes this instance's (see Run's ordering rules),
// then makes the change, then writes it.
package rollout

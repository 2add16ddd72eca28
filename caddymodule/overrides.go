package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/storedoc"
	"go.uber.org/zap"
)

// overrideSet is the operators' overrides, by flag. It is immutable: changes
// return a new set, so the set in force can be shared with readers and
// offered to the replica without copies or locks.
type overrideSet struct {
	m map[string]eval.Override
}

// storedOverrides is overrideSet's form in storage (the same object releases
// before revisioned documents wrote, so that they still read it).
type storedOverrides struct {
	Overrides map[string]eval.Override `json:"overrides"`
}

// MarshalJSON implements json.Marshaler.
func (s overrideSet) MarshalJSON() ([]byte, error) {
	m := s.m
	if m == nil {
		m = map[string]eval.Override{}
	}
	return json.Marshal(storedOverrides{Overrides: m})
}

// UnmarshalJSON implements json.Unmarshaler.
func (s *overrideSet) UnmarshalJSON(data []byte) error {
	var doc storedOverrides
	if err := json.Unmarshal(data, &doc); err != nil {
		return err
	}
	s.m = doc.Overrides
	return nil
}

func (s overrideSet) get(flag string) (eval.Override, bool) {
	o, ok := s.m[flag]
	return o, ok
}

func (s overrideSet) len() int { return len(s.m) }

// with returns the set with flag's override replaced (o nil: removed).
func (s overrideSet) with(flag string, o *eval.Override) overrideSet {
	m := maps.Clone(s.m)
	if m == nil {
		m = map[string]eval.Override{}
	}
	if o == nil {
		delete(m, flag)
	} else {
		m[flag] = *o
	}
	return overrideSet{m: m}
}

// errUnknownFlag is returned for an override of a flag the definitions lack.
var errUnknownFlag = errors.New("unknown flag")

// errInvalidOverride is returned for an override its flag cannot take.
var errInvalidOverride = errors.New("invalid override")

// errNoOverride is returned when deleting an override that is not set.
var errNoOverride = errors.New("no override")

// overrideChange is what a change of one override did.
type overrideChange struct {
	flag     string
	old, new *eval.Override
	revision uint64
}

// setOverride validates an override and puts it in force on every instance
// sharing the storage: a read-modify-write of the shared overrides document,
// whose result is in force here when it returns. o nil deletes the flag's
// override (errNoOverride when there is none); when, is given, a deletion
// happens only if the override in force is exactly *when (the kill a
// rollback set, which restarting the rollout lifts, but not an operator's
// override that replaced it).
func (a *App) setOverride(ctx context.Context, flag string, o, when *eval.Override) (overrideChange, error) {
	ch := overrideChange{flag: flag, new: o}
	if o != nil {
		f, ok := a.engine.definitions().Flag(flag)
		if !ok {
			return ch, fmt.Errorf("%w %q", errUnknownFlag, flag)
		}
		if err := o.Validate(f); err != nil {
			return ch, fmt.Errorf("%w: %v", errInvalidOverride, err)
		}
	}
	// The write must not be abandoned halfway because the admin client
	// went away; a storage that hangs must not hold the caller forever.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
	defer cancel()
	v, changed, err := a.docs.overrides.Update(ctx, a.engine.overrides, func(cur overrideSet, _ uint64) (overrideSet, bool, error) {
		old, had := cur.get(flag)
		if had {
			ch.old = &old
		}
		switch {
		case o == nil && !had:
			return cur, false, errNoOverride
		case o == nil && when != nil && old != *when:
			return cur, false, nil
		case o != nil && had && overridesEqual(old, *o):
			return cur, false, nil
		}
		return cur.with(flag, o), true, nil
	})
	if err != nil {
		return ch, err
	}
	if changed {
		ch.revision = v.Revision
	}
	return ch, nil
}

// overrideChanged records a change of an override: who made it (the admin
// client's address, or what made it automatically), the old and new value,
// in the log and as a Caddy event, override_changed. A change that changed
// nothing (the same override set again) is not recorded.
func (a *App) overrideChanged(ch overrideChange, by string) {
	if ch.revision == 0 {
		return
	}
	msg := "override set"
	if ch.new == nil {
		msg = "override deleted"
	}
	a.logger.Info(msg, zap.String("flag", ch.flag), zap.Any("old", ch.old), zap.Any("new", ch.new),
		zap.String("by", by), zap.Uint64("revision", ch.revision))
	data := map[string]any{"flag": ch.flag, "by": by, "revision": ch.revision}
	if ch.old != nil {
		data["old"] = *ch.old
	}
	if ch.new != nil {
		data["new"] = *ch.new
	}
	a.emit("override_changed", data)
}

// syncOverrides picks up overrides written by any instance sharing the
// storage. The replica takes a version only when it is newer than the one in
// force, so a read that raced with a change made here is harmless.
func (a *App) syncOverrides(ctx context.Context) error {
	applied, err := a.docs.overrides.Sync(ctx, a.engine.overrides)
	if applied {
		a.logger.Info("overrides changed in storage", zap.Int("overrides", a.engine.overrides.Value().len()))
	}
	return err
}

func overridesEqual(x, y eval.Override) bool {
	if x.Killed != y.Killed || x.Variant != y.Variant || (x.RolloutPercentage == nil) != (y.RolloutPercentage == nil) {
		return false
	}
	return x.RolloutPercentage == nil || *x.RolloutPercentage == *y.RolloutPercentage
}

var _ storedoc.Holder[overrideSet] = (*storedoc.Replica[overrideSet])(nil)

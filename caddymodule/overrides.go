package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"time"

	"go.uber.org/zap"

	"github.com/flagsplit/flagsplit/eval"
)

// storedOverrides is the overrides document in Caddy's storage. All instances
// sharing the storage read and write the same document; writers take the
// storage's lock around read-modify-write.
type storedOverrides struct {
	UpdatedAt time.Time                `json:"updated_at"`
	Overrides map[string]eval.Override `json:"overrides"`
}

const overridesLockName = "feature_flags_overrides"

// errUnknownFlag is returned for an override of a flag the definitions lack.
var errUnknownFlag = errors.New("unknown flag")

// setOverride validates, persists and applies an override; nil deletes it.
// It returns whether a deletion removed anything.
func (a *App) setOverride(ctx context.Context, key string, o *eval.Override) (bool, error) {
	if o != nil {
		f, ok := a.engine.store.Load().Flag(key)
		if !ok {
			return false, fmt.Errorf("%w %q", errUnknownFlag, key)
		}
		if err := o.Validate(f); err != nil {
			return false, err
		}
	}
	existed := false
	update := func(m map[string]eval.Override) {
		_, existed = m[key]
		if o == nil {
			delete(m, key)
		} else {
			m[key] = *o
		}
	}
	if a.storage == nil {
		e := a.engine
		e.mu.Lock()
		next := maps.Clone(e.overrides)
		if next == nil {
			next = map[string]eval.Override{}
		}
		update(next)
		e.setOverridesLocked(next, time.Time{})
		e.mu.Unlock()
		return existed, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	var doc storedOverrides
	stamp := time.Time{}
	err := a.withStorageLock(ctx, overridesLockName, func() error {
		var err error
		if doc, err = a.readOverrides(ctx); err != nil {
			return err
		}
		update(doc.Overrides)
		doc.UpdatedAt = time.Now().UTC()
		data, err := json.Marshal(doc)
		if err != nil {
			return err
		}
		if err := a.storage.Store(ctx, a.storageKey(overridesKey), data); err != nil {
			return fmt.Errorf("storing overrides: %w", err)
		}
		if info, err := a.storage.Stat(ctx, a.storageKey(overridesKey)); err == nil {
			stamp = info.Modified
		}
		return nil
	})
	if err != nil {
		return false, err
	}
	e := a.engine
	e.mu.Lock()
	e.setOverridesLocked(doc.Overrides, stamp)
	e.mu.Unlock()
	return existed, nil
}

// withStorageLock runs f holding the storage lock called name, which every
// instance sharing the storage takes around its read-modify-write.
func (a *App) withStorageLock(ctx context.Context, name string, f func() error) error {
	key := a.storageKey(name)
	if err := a.storage.Lock(ctx, key); err != nil {
		return fmt.Errorf("locking %s in storage: %w", name, err)
	}
	defer func() {
		if err := a.storage.Unlock(context.Background(), key); err != nil {
			a.logger.Warn("unlocking storage", zap.String("lock", name), zap.Error(err))
		}
	}()
	return f()
}

func (a *App) readOverrides(ctx context.Context) (storedOverrides, error) {
	doc := storedOverrides{Overrides: map[string]eval.Override{}}
	data, err := a.storage.Load(ctx, a.storageKey(overridesKey))
	if errors.Is(err, fs.ErrNotExist) {
		return doc, nil
	}
	if err != nil {
		return doc, fmt.Errorf("reading overrides: %w", err)
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		return doc, fmt.Errorf("stored overrides are not valid JSON: %w", err)
	}
	if doc.Overrides == nil {
		doc.Overrides = map[string]eval.Override{}
	}
	return doc, nil
}

// loadOverrides picks up overrides written by any instance sharing the
// storage, when the stored document changed since it was last seen.
func (a *App) loadOverrides(ctx context.Context) error {
	if a.storage == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	info, err := a.storage.Stat(ctx, a.storageKey(overridesKey))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("checking overrides: %w", err)
	}
	e := a.engine
	e.mu.Lock()
	seen := e.overridesStamp
	e.mu.Unlock()
	if info.Modified.Equal(seen) {
		return nil
	}
	doc, err := a.readOverrides(ctx)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if !overridesEqual(doc.Overrides, e.overrides) {
		a.logger.Info("overrides changed in storage", zap.Int("overrides", len(doc.Overrides)))
		e.setOverridesLocked(doc.Overrides, info.Modified)
	} else {
		e.overridesStamp = info.Modified
	}
	return nil
}

// setOverridesLocked applies a new set of overrides. Callers hold e.mu.
func (e *engine) setOverridesLocked(overrides map[string]eval.Override, stamp time.Time) {
	e.overrides = overrides
	e.overridesStamp = stamp
	e.apply()
	overridesActive.Set(float64(len(overrides)))
}

func (e *engine) overridesSnapshot() map[string]eval.Override {
	e.mu.Lock()
	defer e.mu.Unlock()
	return maps.Clone(e.overrides)
}

func overridesEqual(a, b map[string]eval.Override) bool {
	return maps.EqualFunc(a, b, func(x, y eval.Override) bool {
		if x.Killed != y.Killed || x.Variant != y.Variant || (x.RolloutPercentage == nil) != (y.RolloutPercentage == nil) {
			return false
		}
		return x.RolloutPercentage == nil || *x.RolloutPercentage == *y.RolloutPercentage
	})
}

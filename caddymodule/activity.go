package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// activityPersistInterval is how often flag activity is written to storage.
const activityPersistInterval = time.Minute

// activity records when this proxy last evaluated each flag, so the admin API
// can list flags nobody asks for any more. Each flag has one cell; the request
// path writes it at most once a second (it compares first), so the cells stay
// read-mostly.
type activity struct {
	mu    sync.Mutex
	since time.Time // when tracking began (kept in storage across restarts)
	cells map[string]*atomic.Int64
}

type storedActivity struct {
	Since         time.Time        `json:"since"`
	LastEvaluated map[string]int64 `json:"last_evaluated"`
}

func newActivity(now time.Time) *activity {
	return &activity{since: now.UTC(), cells: map[string]*atomic.Int64{}}
}

// cell returns the flag's last-evaluated cell (Unix seconds).
func (a *activity) cell(key string) *atomic.Int64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	c, ok := a.cells[key]
	if !ok {
		c = new(atomic.Int64)
		a.cells[key] = c
	}
	return c
}

// touch records an evaluation at unix second now.
func touch(c *atomic.Int64, now int64) {
	if c.Load() != now {
		c.Store(now)
	}
}

func (a *activity) snapshot() storedActivity {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := storedActivity{Since: a.since, LastEvaluated: make(map[string]int64, len(a.cells))}
	for k, c := range a.cells {
		if v := c.Load(); v > 0 {
			out.LastEvaluated[k] = v
		}
	}
	return out
}

// merge folds in a stored record: the earliest start and the latest evaluations.
func (a *activity) merge(s storedActivity) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !s.Since.IsZero() && s.Since.Before(a.since) {
		a.since = s.Since
	}
	for k, v := range s.LastEvaluated {
		c, ok := a.cells[k]
		if !ok {
			c = new(atomic.Int64)
			a.cells[k] = c
		}
		for {
			cur := c.Load()
			if v <= cur || c.CompareAndSwap(cur, v) {
				break
			}
		}
	}
}

// flagActivity is one flag's lifecycle state.
type flagActivity struct {
	LastEvaluated *time.Time `json:"last_evaluated,omitempty"`
	Stale         bool       `json:"stale"`
}

// status says when key was last evaluated and whether that makes it stale: not
// evaluated within staleAfter, or never since tracking began longer ago.
func (a *activity) status(key string, now time.Time, staleAfter time.Duration) flagActivity {
	a.mu.Lock()
	since := a.since
	c := a.cells[key]
	a.mu.Unlock()
	var fa flagActivity
	if c != nil {
		if v := c.Load(); v > 0 {
			t := time.Unix(v, 0).UTC()
			fa.LastEvaluated = &t
			fa.Stale = now.Sub(t) > staleAfter
			return fa
		}
	}
	fa.Stale = now.Sub(since) > staleAfter
	return fa
}

func (a *App) loadActivity(ctx context.Context) {
	if a.storage == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	data, err := a.storage.Load(ctx, a.storageKey(activityKey))
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	var s storedActivity
	if err == nil {
		err = json.Unmarshal(data, &s)
	}
	if err != nil {
		a.logger.Warn("reading stored flag activity", zap.Error(err))
		return
	}
	a.engine.activity.merge(s)
}

// storeActivity merges this instance's activity with the stored record (other
// instances may share it) and writes it back.
func (a *App) storeActivity(ctx context.Context) {
	if a.storage == nil || a.engine == nil {
		return
	}
	a.loadActivity(ctx)
	data, err := json.Marshal(a.engine.activity.snapshot())
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := a.storage.Store(ctx, a.storageKey(activityKey), data); err != nil {
		a.logger.Warn("storing flag activity", zap.Error(err))
	}
}

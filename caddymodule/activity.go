package caddymodule

import (
	"context"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/flagsplit/flagsplit/storedoc"
)

// activityPersistInterval is how often flag activity is written to storage.
const activityPersistInterval = time.Minute

// activity records when this proxy last evaluated each flag, so the admin API
// can list flags nobody asks for any more. Each flag has one cell; the request
// path writes it at most once a second (it compares first), so the cells stay
// read-mostly.
type activity struct {
	// rev is the revision of the stored record last merged or written.
	rev   atomic.Uint64
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

// Current implements storedoc.Holder: this instance's record, at the
// revision of the stored record last merged or written.
func (a *activity) Current() (storedoc.Version[storedActivity], bool) {
	return storedoc.Version[storedActivity]{Revision: a.rev.Load(), Value: a.snapshot()}, true
}

// Offer implements storedoc.Holder. Activity merges rather than replaces
// (earliest start, latest evaluations), which gives the same result in any
// order, so every version is taken; it reports whether the version was
// newer than the last one taken.
func (a *activity) Offer(v storedoc.Version[storedActivity]) bool {
	a.merge(v.Value)
	for {
		cur := a.rev.Load()
		if v.Revision <= cur {
			return false
		}
		if a.rev.CompareAndSwap(cur, v.Revision) {
			return true
		}
	}
}

// mergedWith returns the stored record s with this instance's activity
// folded in, and whether that changes s.
func (a *activity) mergedWith(s storedActivity) (storedActivity, bool) {
	out := storedActivity{Since: s.Since, LastEvaluated: maps.Clone(s.LastEvaluated)}
	if out.LastEvaluated == nil {
		out.LastEvaluated = map[string]int64{}
	}
	mine := a.snapshot()
	changed := false
	if out.Since.IsZero() || mine.Since.Before(out.Since) {
		out.Since, changed = mine.Since, true
	}
	for k, v := range mine.LastEvaluated {
		if v > out.LastEvaluated[k] {
			out.LastEvaluated[k], changed = v, true
		}
	}
	return out, changed
}

// loadActivity merges the stored record into this instance's, so that a
// restart does not forget when flags were last evaluated.
func (a *App) loadActivity(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := a.docs.activity.Sync(ctx, a.engine.activity); err != nil {
		a.logger.Warn("reading stored flag activity", zap.Error(err))
	}
}

// storeActivity merges this instance's activity into the stored record (other
// instances share it) under the document's lock, and writes it when that
// changes it.
func (a *App) storeActivity(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	act := a.engine.activity
	_, _, err := a.docs.activity.Update(ctx, act, func(cur storedActivity, _ uint64) (storedActivity, bool, error) {
		merged, changed := act.mergedWith(cur)
		return merged, changed, nil
	})
	if err != nil {
		a.logger.Warn("storing flag activity", zap.Error(err))
	}
}

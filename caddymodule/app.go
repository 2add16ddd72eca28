package caddymodule

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/posthog"
	"github.com/flagsplit/flagsplit/proxy"
)

func init() {
	caddy.RegisterModule(App{})
}

// Defaults for the app's options.
const (
	DefaultCacheSize     = 100000
	DefaultWatchInterval = caddy.Duration(time.Second)
	DefaultSyncInterval  = caddy.Duration(2 * time.Second)
	DefaultStaleAfter    = caddy.Duration(30 * 24 * time.Hour)
)

// App is the feature_flags app: it holds the flag definitions in force, runtime
// overrides, the result cache and per-variant statistics, keeps the definitions
// fresh (from a file, or polled from PostHog), and serves the handler, matcher,
// selection policy and admin API.
//
// Its state lives in a caddy.UsagePool entry keyed by the definitions source
// and cache size, so a config reload that keeps those keeps the last good
// definitions, the overrides, the warm cache and the statistics. Overrides and
// the last-known-good PostHog answer are also kept in Caddy's storage, which
// carries them across restarts and to other instances sharing the storage.
type App struct {
	// Definitions is a file holding PostHog's flag-definitions JSON (the body of
	// /flags/definitions). Without a posthog block it is the source, watched
	// and reloaded when it changes; with one it is the fallback used until
	// PostHog (or the last-known-good copy in storage) answers.
	Definitions string `json:"definitions,omitempty"`

	// PostHog, when set, polls live definitions from a PostHog instance.
	PostHog *PostHogConfig `json:"posthog,omitempty"`

	// CacheSize bounds the result cache, in subjects (distinct id plus the
	// properties evaluated). 0 disables the cache. Default: 100000.
	CacheSize *int `json:"cache_size,omitempty"`

	// CacheMinCost is the estimated time to evaluate a handler's flags from
	// which their answers are cached. Cheaper flag sets are evaluated on every
	// request: that costs less than a cache lookup plus what a large live
	// cache costs the garbage collector. 0 caches every set. Default: 10µs.
	CacheMinCost *caddy.Duration `json:"cache_min_cost,omitempty"`

	// WatchInterval is how often the definitions file is checked for changes.
	// Default: 1s.
	WatchInterval caddy.Duration `json:"watch_interval,omitempty"`

	// SyncInterval is how often overrides set by other instances are picked up
	// from the shared storage. Default: 2s.
	SyncInterval caddy.Duration `json:"sync_interval,omitempty"`

	// StaleAfter is how long a flag may go unevaluated by this proxy before the
	// admin API lists it as stale. Default: 720h (30 days).
	StaleAfter caddy.Duration `json:"stale_after,omitempty"`

	// Rollouts are automated ramps of flags, with guardrails.
	Rollouts []*RolloutConfig `json:"rollouts,omitempty"`

	ctx      caddy.Context
	rollouts map[string]*rolloutRun
	// previousRollouts are the rollouts this app's replaced, put back if
	// this app stops while its own are still in force (a failed reload).
	previousRollouts *map[string]*rolloutRun
	// caddyEvents emits rollout changes as Caddy events.
	caddyEvents *caddyevents.App
	engine      *engine
	engineKey   string
	logger      *zap.Logger
	storage     certmagic.Storage
	poller      *posthog.Poller
	cancel      context.CancelFunc
	wg          *sync.WaitGroup
	implicit    *implicitHandler
	// events is the exposure-event pipe when the posthog block enables
	// events; eventsAll reports every evaluated flag, not only routing ones.
	events    *eventPipe
	eventsKey string
	eventsAll bool
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "feature_flags",
		New: func() caddy.Module { return new(App) },
	}
}

// engines holds the state that must outlive a config reload.
var engines = caddy.NewUsagePool()

// engine is the app's long-lived state.
type engine struct {
	store    *eval.Store
	cache    *eval.Cache
	outcomes proxy.Outcomes
	activity *activity

	mu sync.Mutex // guards the fields below and serialises definition changes
	// base is the last good parsed definitions, before overrides.
	base      *eval.Definitions
	source    sourceInfo
	etagValue string
	lastFetch time.Time
	overrides map[string]eval.Override
	// overridesStamp is the storage modification time of the overrides last
	// read or written, to notice other instances' changes.
	overridesStamp time.Time
	// file is what the definitions file looked like when last read.
	file fileState

	// rollouts are the ramps in force, by flag (written under mu, read
	// without it by the request path).
	rollouts atomic.Pointer[map[string]*rolloutRun]
	// rolloutMu guards the runs' bookkeeping and rolloutsStamp, the storage
	// modification time of the rollout progress last read.
	rolloutMu     sync.Mutex
	rolloutsStamp time.Time
}

type sourceInfo struct {
	Kind     string    `json:"kind"`
	Location string    `json:"location,omitempty"`
	Loaded   time.Time `json:"loaded_at"`
	Checksum string    `json:"checksum,omitempty"`
	ETag     string    `json:"etag,omitempty"`
	Error    string    `json:"last_error,omitempty"`
}

type fileState struct {
	size    int64
	modTime time.Time
	sum     [sha256.Size]byte
}

func newEngine(cacheSize int) *engine {
	return &engine{store: eval.NewStore(), cache: eval.NewCache(cacheSize), activity: newActivity(time.Now())}
}

// Destruct implements caddy.Destructor.
func (e *engine) Destruct() error {
	e.cache.Purge()
	return nil
}

// Provision sets up the app.
func (a *App) Provision(ctx caddy.Context) error {
	a.ctx = ctx
	a.logger = ctx.Logger()
	a.implicit = new(implicitHandler)
	a.wg = new(sync.WaitGroup)
	a.storage = storageOf(ctx)
	if a.CacheSize == nil {
		size := DefaultCacheSize
		a.CacheSize = &size
	}
	if *a.CacheSize < 0 {
		return fmt.Errorf("cache_size must not be negative, got %d", *a.CacheSize)
	}
	for name, d := range map[string]*caddy.Duration{"watch_interval": &a.WatchInterval, "sync_interval": &a.SyncInterval, "stale_after": &a.StaleAfter} {
		if *d < 0 {
			return fmt.Errorf("%s must be positive", name)
		}
	}
	if a.WatchInterval == 0 {
		a.WatchInterval = DefaultWatchInterval
	}
	if a.SyncInterval == 0 {
		a.SyncInterval = DefaultSyncInterval
	}
	if a.StaleAfter == 0 {
		a.StaleAfter = DefaultStaleAfter
	}
	if a.Definitions != "" {
		abs, err := filepath.Abs(a.Definitions)
		if err != nil {
			return fmt.Errorf("definitions %q: %w", a.Definitions, err)
		}
		a.Definitions = abs
	}
	if err := a.provisionPostHog(); err != nil {
		return err
	}
	registerMetrics(ctx)

	a.engineKey = "definitions=" + a.Definitions + ";cache=" + strconv.Itoa(*a.CacheSize)
	if a.PostHog != nil {
		a.engineKey += ";posthog=" + a.PostHog.Host + "|" + a.PostHog.ProjectAPIKey
	}
	val, _, err := engines.LoadOrNew(a.engineKey, func() (caddy.Destructor, error) {
		return newEngine(*a.CacheSize), nil
	})
	if err != nil {
		return fmt.Errorf("feature_flags state: %w", err)
	}
	a.engine = val.(*engine)
	minCost := eval.DefaultMinCost
	if a.CacheMinCost != nil {
		if *a.CacheMinCost < 0 {
			return fmt.Errorf("cache_min_cost must not be negative")
		}
		minCost = int(time.Duration(*a.CacheMinCost).Nanoseconds())
	}
	a.engine.cache.SetMinCost(minCost)
	if err := a.provisionRollouts(); err != nil {
		return err
	}
	if len(a.rollouts) > 0 {
		eventsApp, err := ctx.App("events")
		if err != nil {
			return fmt.Errorf("loading the events app: %w", err)
		}
		a.caddyEvents = eventsApp.(*caddyevents.App)
	}

	if a.Definitions != "" {
		// Read the file now: `caddy validate` and a reload with a broken file
		// fail here, with the JSON path of the problem, before anything serves.
		// With PostHog configured the file only fills in until PostHog (or the
		// stored copy) answers.
		defs, sum, info, err := readDefinitionsFile(a.Definitions)
		if err != nil {
			return err
		}
		e := a.engine
		e.mu.Lock()
		if e.base == nil || (a.PostHog == nil && sum != e.file.sum) {
			e.file = fileState{size: info.Size(), modTime: info.ModTime(), sum: sum}
			e.install(defs, sourceInfo{Kind: "file", Location: a.Definitions, Loaded: time.Now(), Checksum: hex.EncodeToString(sum[:8])})
		}
		e.mu.Unlock()
		a.engine.logWarnings(a.logger)
	} else if a.PostHog == nil {
		a.logger.Warn("feature_flags has no definitions source (definitions file or posthog block): every flag serves false")
	}
	return nil
}

// Start loads state from storage and starts the background work: the file
// watcher or the PostHog poller, and the storage sync of overrides and flag
// activity. Everything stops when the app stops.
func (a *App) Start() error {
	ctx, cancel := context.WithCancel(context.Background())
	a.cancel = cancel
	if err := a.loadOverrides(ctx); err != nil {
		a.logger.Warn("reading stored overrides", zap.Error(err))
	}
	a.loadActivity(ctx)
	a.startRollouts(ctx)
	if a.PostHog != nil {
		a.startPostHog(ctx)
		a.startEvents(ctx)
	} else if a.Definitions != "" {
		a.goEvery(ctx, time.Duration(a.WatchInterval), a.checkFile)
	}
	a.goEvery(ctx, time.Duration(a.SyncInterval), func(ctx context.Context) {
		if err := a.loadOverrides(ctx); err != nil {
			a.logger.Warn("syncing overrides from storage", zap.Error(err))
		}
		a.syncRollouts(ctx)
	})
	a.goEvery(ctx, activityPersistInterval, a.storeActivity)
	return nil
}

// goEvery runs f every interval until ctx is done.
func (a *App) goEvery(ctx context.Context, interval time.Duration, f func(context.Context)) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		ticker := time.NewTicker(interval)
		defer ticker.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-ticker.C:
				f(ctx)
			}
		}
	}()
}

// Stop stops the background work, sends the queued exposure events and saves
// flag activity.
func (a *App) Stop() error {
	if a.cancel != nil {
		a.cancel()
	}
	a.wg.Wait()
	a.stopRollouts()
	a.flushEvents()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	a.storeActivity(ctx)
	return nil
}

// Cleanup releases the app's hold on the shared state.
func (a *App) Cleanup() error {
	if a.cancel != nil {
		a.cancel()
	}
	err := a.cleanupEvents()
	if a.engineKey != "" {
		if _, e := engines.Delete(a.engineKey); e != nil {
			err = errors.Join(err, e)
		}
	}
	return err
}

// ProjectAPIKey is the PostHog project key, which names the posthog-js cookie.
// Empty when no posthog block is configured.
func (a *App) ProjectAPIKey() string {
	if a.PostHog == nil {
		return ""
	}
	return a.PostHog.ProjectAPIKey
}

func (a *App) checkFile(context.Context) {
	changed, err := a.engine.loadFile(a.Definitions)
	switch {
	case err != nil:
		definitionsErrors.Inc()
		a.logger.Error("flag definitions file rejected; the last good definitions keep serving",
			zap.String("file", a.Definitions), zap.Error(err))
	case changed:
		d := a.engine.store.Load()
		a.logger.Info("flag definitions reloaded", zap.String("file", a.Definitions), zap.Int("flags", d.Len()))
		a.engine.logWarnings(a.logger)
	}
}

// refresh re-reads the source now: a fetch from PostHog or a read of the file.
func (a *App) refresh(ctx context.Context) (string, error) {
	if a.poller != nil {
		outcome, err := a.poller.Refresh(ctx)
		if err != nil {
			return "", err
		}
		return outcome.String(), nil
	}
	if a.Definitions == "" {
		return "", errors.New("no definitions source configured")
	}
	changed, err := a.engine.loadFile(a.Definitions)
	if err != nil {
		definitionsErrors.Inc()
		return "", err
	}
	if changed {
		return "modified", nil
	}
	return "not_modified", nil
}

// loadFile reads the definitions file if it changed since the last read and puts
// it in force when it parses without problems; otherwise the last good
// definitions stay.
func (e *engine) loadFile(path string) (changed bool, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	info, err := os.Stat(path)
	if err != nil {
		e.source.Error = err.Error()
		return false, fmt.Errorf("flag definitions: %w", err)
	}
	if info.Size() == e.file.size && info.ModTime().Equal(e.file.modTime) {
		return false, nil
	}
	defs, sum, info, err := readDefinitionsFile(path)
	if err != nil {
		e.source.Error = err.Error()
		// Remember the broken version so it is reported once, not every tick.
		if info != nil {
			e.file = fileState{size: info.Size(), modTime: info.ModTime(), sum: e.file.sum}
		}
		return false, err
	}
	if e.base != nil && sum == e.file.sum {
		// Same content as the definitions in force (e.g. a broken edit was
		// reverted): nothing to reload.
		e.file = fileState{size: info.Size(), modTime: info.ModTime(), sum: sum}
		e.source.Error = ""
		return false, nil
	}
	e.file = fileState{size: info.Size(), modTime: info.ModTime(), sum: sum}
	e.install(defs, sourceInfo{Kind: "file", Location: path, Loaded: time.Now(), Checksum: hex.EncodeToString(sum[:8])})
	return true, nil
}

func readDefinitionsFile(path string) (*eval.Definitions, [sha256.Size]byte, os.FileInfo, error) {
	var sum [sha256.Size]byte
	info, err := os.Stat(path)
	if err != nil {
		return nil, sum, nil, fmt.Errorf("flag definitions: %w", err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, sum, info, fmt.Errorf("flag definitions: %w", err)
	}
	sum = sha256.Sum256(data)
	defs, err := parseDefinitions(data)
	if err != nil {
		return nil, sum, info, fmt.Errorf("%s: %w", path, err)
	}
	return defs, sum, info, nil
}

// parseDefinitionsFile reads and parses a definitions file.
func parseDefinitionsFile(path string) (*eval.Definitions, error) {
	defs, _, _, err := readDefinitionsFile(path)
	return defs, err
}

// parseDefinitions parses and refuses documents with malformed parts: a file an
// operator wrote should be fixed, not half used.
func parseDefinitions(data []byte) (*eval.Definitions, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, errors.New("flag definitions: file is empty")
	}
	defs, err := eval.Parse(data)
	if err != nil {
		return nil, err
	}
	if p := defs.Problems(); len(p) > 0 {
		msgs := make([]string, len(p))
		for i, pr := range p {
			msgs[i] = pr.String()
		}
		return nil, fmt.Errorf("flag definitions are malformed: %s", strings.Join(msgs, "; "))
	}
	return defs, nil
}

// install puts new base definitions in force, with the overrides applied.
// Callers hold e.mu.
func (e *engine) install(defs *eval.Definitions, src sourceInfo) {
	e.base = defs
	e.source = src
	if src.Kind == "posthog" {
		e.lastFetch = time.Now()
	}
	e.apply()
	definitionsLastSuccess.SetToCurrentTime()
	definitionsFlags.Set(float64(defs.Len()))
	definitionsReady.Set(1)
}

// apply puts base plus overrides in force under a new generation, which also
// retires every cached answer. Callers hold e.mu.
func (e *engine) apply() {
	if e.base == nil {
		return
	}
	e.store.Swap(e.base.WithOverrides(e.rolloutOverrides()))
}

func (e *engine) sourceKind() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.source.Kind
}

func (e *engine) etag() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.etagValue
}

func (e *engine) touchFetch() {
	e.mu.Lock()
	e.lastFetch = time.Now()
	e.source.Error = ""
	e.mu.Unlock()
}

func (e *engine) setError(msg string) {
	e.mu.Lock()
	e.source.Error = msg
	e.mu.Unlock()
}

func (e *engine) logWarnings(logger *zap.Logger) {
	for _, w := range e.store.Load().Warnings() {
		logger.Warn("flag cannot be fully evaluated locally", zap.String("flag", w.Flag),
			zap.String("path", w.Path), zap.String("detail", w.Message))
	}
}

func checksum(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// Interface guards.
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
	_ caddy.Destructor   = (*engine)(nil)
)

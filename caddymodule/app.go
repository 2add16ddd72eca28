package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"go.uber.org/zap"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/posthog"
	"github.com/flagsplit/flagsplit/rollout"
	"github.com/flagsplit/flagsplit/storedoc"
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
// Its state lives in a caddy.UsagePool entry keyed by the definitions source,
// cache size and storage, so a config reload that keeps those keeps the last
// good definitions, the overrides, the warm cache and the statistics.
// Overrides, rollout progress, flag activity and the last-known-good PostHog
// answer are also kept in Caddy's storage, which carries them across restarts
// and to other instances sharing the storage.
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

	// SyncInterval is how often overrides and rollout progress written by
	// other instances are picked up from the shared storage. Default: 2s.
	SyncInterval caddy.Duration `json:"sync_interval,omitempty"`

	// StaleAfter is how long a flag may go unevaluated by this proxy before the
	// admin API lists it as stale. Default: 720h (30 days).
	StaleAfter caddy.Duration `json:"stale_after,omitempty"`

	// Rollouts are automated ramps of flags, with guardrails.
	Rollouts []*RolloutConfig `json:"rollouts,omitempty"`

	ctx    caddy.Context
	logger *zap.Logger
	clock  clock

	engine    *engine
	engineKey string
	storage   storedoc.Storage
	docs      documents
	file      *fileSource
	poller    *posthog.Poller
	// rollouts are this config's rollouts (put in force at Start).
	rollouts *rollout.Set
	// caddyEvents emits rollout changes and control-plane events as Caddy
	// events.
	caddyEvents *caddyevents.App

	// refs are the config's references to flags, checked against the
	// definitions.
	refs *references

	cancel   context.CancelFunc
	wg       *sync.WaitGroup
	implicit *implicitHandler
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

// Provision sets up the app. It reads the definitions file, so that `caddy
// validate` and a reload with a broken file fail here, with the JSON path of
// the problem, before anything serves; it starts nothing.
func (a *App) Provision(ctx caddy.Context) error {
	a.ctx = ctx
	a.logger = ctx.Logger()
	if a.clock == nil {
		a.clock = realClock{}
	}
	a.implicit = new(implicitHandler)
	a.refs = new(references)
	a.wg = new(sync.WaitGroup)
	a.storage = ctx.Storage()
	if err := a.normalise(); err != nil {
		return err
	}
	if err := a.provisionPostHog(); err != nil {
		return err
	}
	registerMetrics(ctx)

	a.engineKey = "definitions=" + a.Definitions + ";cache=" + strconv.Itoa(*a.CacheSize) + ";storage=" + storageIdentity(ctx.Storage())
	if a.PostHog != nil {
		a.engineKey += ";posthog=" + a.PostHog.Host + "|" + a.PostHog.ProjectAPIKey
	}
	val, _, err := engines.LoadOrNew(a.engineKey, func() (caddy.Destructor, error) {
		return newEngine(*a.CacheSize, a.clock.Now), nil
	})
	if err != nil {
		return fmt.Errorf("feature_flags state: %w", err)
	}
	a.engine = val.(*engine)
	a.engine.setLogger(a.logger)
	minCost := eval.DefaultMinCost
	if a.CacheMinCost != nil {
		minCost = int(time.Duration(*a.CacheMinCost).Nanoseconds())
	}
	a.engine.cache.SetMinCost(minCost)
	if err := a.provisionRollouts(); err != nil {
		return err
	}
	eventsApp, err := ctx.App("events")
	if err != nil {
		return fmt.Errorf("loading the events app: %w", err)
	}
	a.caddyEvents = eventsApp.(*caddyevents.App)

	if a.Definitions != "" {
		a.file = &fileSource{path: a.Definitions, kind: sourceFile}
		if a.PostHog != nil {
			a.file.kind = sourceFallbackFile
		}
		res, err := a.file.load(a.engine)
		if err != nil {
			return err
		}
		if res.changed {
			a.logWarnings(res.defs)
		}
	} else if a.PostHog == nil {
		a.logger.Warn("feature_flags has no definitions source (definitions file or posthog block): every flag serves false")
	}
	for _, run := range a.rollouts.Runs() {
		a.reference(flagReference{flag: run.Flag(), where: "rollout " + run.Flag()})
	}
	return nil
}

// normalise checks the options and fills in their defaults.
func (a *App) normalise() error {
	if a.CacheSize == nil {
		size := DefaultCacheSize
		a.CacheSize = &size
	}
	if *a.CacheSize < 0 {
		return fmt.Errorf("cache_size must not be negative, got %d", *a.CacheSize)
	}
	if a.CacheMinCost != nil && *a.CacheMinCost < 0 {
		return errors.New("cache_min_cost must not be negative")
	}
	for _, opt := range []struct {
		name string
		d    *caddy.Duration
		def  caddy.Duration
	}{
		{"watch_interval", &a.WatchInterval, DefaultWatchInterval},
		{"sync_interval", &a.SyncInterval, DefaultSyncInterval},
		{"stale_after", &a.StaleAfter, DefaultStaleAfter},
	} {
		if *opt.d < 0 {
			return fmt.Errorf("%s must be positive", opt.name)
		}
		if *opt.d == 0 {
			*opt.d = opt.def
		}
	}
	if a.Definitions != "" {
		abs, err := filepath.Abs(a.Definitions)
		if err != nil {
			return fmt.Errorf("definitions %q: %w", a.Definitions, err)
		}
		a.Definitions = abs
	}
	return nil
}

// Start loads state from storage and starts the background work: the file
// watcher or the PostHog poller and event sender, the storage sync, flag
// activity and the rollout ticker. Everything stops when the app stops.
func (a *App) Start() error {
	ctx, cancel := context.WithCancel(context.Background())
	a.cancel = cancel
	a.docs = a.newDocuments(a.storage)
	if err := a.syncOverrides(ctx); err != nil {
		a.logger.Warn("reading stored overrides", zap.Error(err))
	}
	a.loadActivity(ctx)
	a.startRollouts(ctx)
	if a.PostHog != nil {
		a.startPostHog(ctx)
		a.startEvents()
	} else if a.file != nil {
		a.goEvery(ctx, time.Duration(a.WatchInterval), a.checkFile)
	}
	a.goEvery(ctx, time.Duration(a.SyncInterval), a.syncShared)
	a.goEvery(ctx, activityPersistInterval, a.storeActivity)
	a.checkSites()
	if a.engine.snapshot().ready {
		a.checkReferences(a.engine.definitions())
	}
	return nil
}

// syncShared picks up what other instances sharing the storage changed.
func (a *App) syncShared(ctx context.Context) {
	if err := a.syncOverrides(ctx); err != nil {
		a.logger.Warn("syncing overrides from storage", zap.Error(err))
	}
	a.engine.rollouts.Sync(ctx, a.rolloutHooks())
}

// goEvery runs f every interval of the app's clock until ctx is done.
func (a *App) goEvery(ctx context.Context, interval time.Duration, f func(context.Context)) {
	ticks, stop := a.clock.NewTicker(interval)
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		defer stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-ticks:
				f(ctx)
			}
		}
	}()
}

// stopBudget bounds what Stop does after the background work has ended:
// storing flag activity. A reload waits for it; it never waits for PostHog,
// since the event flush Stop starts is asynchronous (the pipe's Destruct
// bounds the last delivery).
const stopBudget = 4 * time.Second

// Stop stops the background work, puts the previous config's rollouts back if
// this config's are still in force (a reload that failed after this app
// started), sends the queued exposure events and saves flag activity.
func (a *App) Stop() error {
	if a.cancel != nil {
		a.cancel()
	}
	a.wg.Wait()
	a.stopRollouts()
	ctx, cancel := context.WithTimeout(context.Background(), stopBudget)
	defer cancel()
	a.flushEvents()
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

// checkFile reloads the definitions file when it changed.
func (a *App) checkFile(context.Context) {
	res, changed, err := a.file.check(a.engine)
	if changed {
		a.fileLoaded(res, err)
	}
}

// fileLoaded reports a read of the definitions file.
func (a *App) fileLoaded(res installResult, err error) {
	switch {
	case err != nil:
		a.logger.Error("flag definitions file rejected; the last good definitions keep serving",
			zap.String("file", a.file.path), zap.Error(err))
		a.definitionsFailed(a.file.kind, err)
	case res.changed:
		a.logger.Info("flag definitions reloaded", zap.String("file", a.file.path), zap.Int("flags", res.defs.Len()))
		a.definitionsRefreshed(res)
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
	if a.file == nil {
		return "", errors.New("no definitions source configured")
	}
	res, err := a.file.load(a.engine)
	a.fileLoaded(res, err)
	switch {
	case err != nil:
		return "", err
	case res.changed:
		return "modified", nil
	}
	return "not_modified", nil
}

// definitionsRefreshed reports new definitions in force: what they cannot
// evaluate locally, the config's references they no longer satisfy, and a
// Caddy event, definitions_refreshed.
func (a *App) definitionsRefreshed(res installResult) {
	a.logWarnings(res.defs)
	a.checkReferences(res.defs)
	src := a.engine.snapshot().source
	data := map[string]any{"source": src.Kind, "flags": res.defs.Len(), "checksum": src.Checksum}
	if src.Location != "" {
		data["location"] = src.Location
	}
	if src.ETag != "" {
		data["etag"] = src.ETag
	}
	a.emit("definitions_refreshed", data)
}

// definitionsFailed reports a failure to load definitions (the last good
// ones keep serving) as a Caddy event, definitions_failed.
func (a *App) definitionsFailed(kind sourceKind, err error) {
	a.emit("definitions_failed", map[string]any{"source": kind.name(), "error": err.Error()})
}

// logWarnings logs what the definitions cannot evaluate locally.
func (a *App) logWarnings(defs *eval.Definitions) {
	for _, w := range defs.Warnings() {
		a.logger.Warn("flag cannot be fully evaluated locally", zap.String("flag", w.Flag),
			zap.String("path", w.Path), zap.String("detail", w.Message))
	}
}

// Interface guards.
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
	_ caddy.Destructor   = (*engine)(nil)
)

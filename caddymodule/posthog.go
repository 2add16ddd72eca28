package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/posthog"
)

// PostHogConfig connects the app to a PostHog instance for live definitions.
type PostHogConfig struct {
	// Host is the PostHog instance. Default: https://us.i.posthog.com.
	Host string `json:"host,omitempty"`
	// ProjectAPIKey is the project token (phc_...). It also names the
	// posthog-js cookie, ph_<project key>_posthog. Placeholders such as
	// {env.POSTHOG_PROJECT_API_KEY} are expanded.
	ProjectAPIKey string `json:"project_api_key,omitempty"`
	// PersonalAPIKey is a personal API key with feature_flag:read (phx_...)
	// or a project secret key (phs_...).
	PersonalAPIKey string `json:"personal_api_key,omitempty"`
	// PollInterval is how often definitions are polled. Default: 30s.
	PollInterval caddy.Duration `json:"poll_interval,omitempty"`
	// Timeout bounds each request to PostHog. Default: 10s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// Events, when enabled, sends $feature_flag_called exposure events.
	Events *EventsConfig `json:"events,omitempty"`
}

// minPollInterval is posthog-node's floor. Each poll is billed like ten /flags
// requests (a 304 may be too), so intervals well above it are usual.
const minPollInterval = 100 * time.Millisecond

// storage keys, under the app's namespace.
const (
	definitionsKey = "definitions.json"
	overridesKey   = "overrides.json"
	activityKey    = "activity.json"
)

// storedDefinitions is the last-known-good copy of PostHog's answer.
type storedDefinitions struct {
	FetchedAt   time.Time       `json:"fetched_at"`
	ETag        string          `json:"etag,omitempty"`
	Host        string          `json:"host"`
	Definitions json.RawMessage `json:"definitions"`
}

func (a *App) provisionPostHog() error {
	p := a.PostHog
	if p == nil {
		return nil
	}
	repl := caddy.NewReplacer()
	p.Host = repl.ReplaceAll(p.Host, "")
	p.ProjectAPIKey = repl.ReplaceAll(p.ProjectAPIKey, "")
	p.PersonalAPIKey = repl.ReplaceAll(p.PersonalAPIKey, "")
	if p.Host == "" {
		p.Host = posthog.DefaultHost
	}
	if p.ProjectAPIKey == "" {
		return errors.New("posthog: project_api_key is required")
	}
	if p.PersonalAPIKey == "" {
		return errors.New("posthog: personal_api_key (a phx_ personal key or a phs_ secret key) is required")
	}
	if p.PollInterval == 0 {
		p.PollInterval = caddy.Duration(posthog.DefaultPollInterval)
	}
	if p.PollInterval < caddy.Duration(minPollInterval) {
		return fmt.Errorf("posthog: poll_interval must be at least %s, got %s", minPollInterval, time.Duration(p.PollInterval))
	}
	if p.Timeout == 0 {
		p.Timeout = caddy.Duration(posthog.DefaultTimeout)
	}
	client := &posthog.Client{Host: p.Host, ProjectAPIKey: p.ProjectAPIKey, PersonalAPIKey: p.PersonalAPIKey,
		Timeout: time.Duration(p.Timeout), UserAgent: userAgent()}
	if _, err := client.DefinitionsURL(); err != nil {
		return err
	}
	a.poller = &posthog.Poller{Client: client, Interval: time.Duration(p.PollInterval)}
	return a.provisionEvents(a.logger.Named("events"))
}

// startPostHog serves the last-known-good copy until PostHog answers, then
// polls.
func (a *App) startPostHog(ctx context.Context) {
	if a.poller == nil {
		return
	}
	e := a.engine
	if e.sourceKind() != "posthog" {
		if stored, err := a.loadStoredDefinitions(ctx); err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				a.logger.Warn("reading the last-known-good flag definitions", zap.Error(err))
			}
		} else {
			a.logger.Info("serving the last-known-good flag definitions until PostHog answers",
				zap.Time("fetched_at", stored.FetchedAt), zap.Int("flags", e.store.Load().Len()))
		}
	}
	a.poller.SetETag(e.etag())
	a.poller.Handlers = posthog.Handlers{
		Definitions:  func(body []byte, etag string) error { return a.acceptDefinitions(ctx, body, etag) },
		NotModified:  func() { e.touchFetch(); definitionsLastSuccess.SetToCurrentTime() },
		QuotaLimited: func(detail string) { a.quotaLimited(detail) },
		Unauthorized: func(status int, detail string) {
			definitionsErrors.Inc()
			e.setError(fmt.Sprintf("PostHog refused the key (%d): %s", status, detail))
			a.logger.Error("PostHog refused the personal API key; the last good flag definitions keep serving. "+
				"Check personal_api_key (needs feature_flag:read) and project_api_key",
				zap.Int("status", status), zap.String("detail", detail))
		},
		Failure: func(err error, consecutive int, retryIn time.Duration) {
			definitionsErrors.Inc()
			e.setError(err.Error())
			a.logger.Warn("fetching flag definitions failed; the last good definitions keep serving",
				zap.Error(err), zap.Int("consecutive_failures", consecutive), zap.Duration("retry_in", retryIn))
		},
	}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		a.poller.Run(ctx)
	}()
}

// acceptDefinitions installs a definitions body from PostHog and keeps a copy
// in storage. A body that does not parse is refused (the last good set stays);
// malformed flags inside a parseable body are logged and served as
// inconclusive, since refusing the whole answer would freeze every other flag.
func (a *App) acceptDefinitions(ctx context.Context, body []byte, etag string) error {
	defs, err := eval.Parse(body)
	if err != nil {
		return fmt.Errorf("PostHog sent definitions that do not parse: %w", err)
	}
	for _, p := range defs.Problems() {
		a.logger.Error("malformed flag in PostHog's definitions; it serves false", zap.String("problem", p.String()))
	}
	e := a.engine
	e.mu.Lock()
	changed := e.base == nil || e.source.Kind != "posthog" || e.source.Checksum != checksum(body)
	e.etagValue = etag
	e.install(defs, sourceInfo{Kind: "posthog", Location: a.PostHog.Host, Loaded: time.Now(), Checksum: checksum(body), ETag: etag})
	e.mu.Unlock()
	if changed {
		a.logger.Info("flag definitions updated from PostHog", zap.Int("flags", defs.Len()), zap.String("etag", etag))
		e.logWarnings(a.logger)
	}
	if err := a.storeDefinitions(ctx, body, etag); err != nil {
		a.logger.Warn("keeping a last-known-good copy of the flag definitions", zap.Error(err))
	}
	return nil
}

func (a *App) quotaLimited(detail string) {
	e := a.engine
	e.mu.Lock()
	e.etagValue = ""
	e.install(emptyDefinitions(), sourceInfo{Kind: "posthog", Location: a.PostHog.Host, Loaded: time.Now(),
		Error: "quota limited: " + detail})
	e.mu.Unlock()
	definitionsErrors.Inc()
	a.logger.Error("PostHog says the project is over its feature flag quota (402); flag definitions dropped, "+
		"every flag serves false and routes to default until the quota allows", zap.String("detail", detail))
}

func emptyDefinitions() *eval.Definitions {
	d, _ := eval.Parse([]byte(`{"flags": []}`))
	return d
}

func (a *App) storageKey(name string) string {
	ns := "local"
	if a.PostHog != nil {
		ns = a.PostHog.ProjectAPIKey
	}
	return "feature_flags/" + ns + "/" + name
}

func (a *App) storeDefinitions(ctx context.Context, body []byte, etag string) error {
	if a.storage == nil {
		return nil
	}
	data, err := json.Marshal(storedDefinitions{FetchedAt: time.Now().UTC(), ETag: etag, Host: a.PostHog.Host, Definitions: body})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return a.storage.Store(ctx, a.storageKey(definitionsKey), data)
}

func (a *App) loadStoredDefinitions(ctx context.Context) (storedDefinitions, error) {
	var stored storedDefinitions
	if a.storage == nil {
		return stored, fs.ErrNotExist
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	data, err := a.storage.Load(ctx, a.storageKey(definitionsKey))
	if err != nil {
		return stored, err
	}
	if err := json.Unmarshal(data, &stored); err != nil {
		return stored, fmt.Errorf("stored definitions: %w", err)
	}
	defs, err := eval.Parse(stored.Definitions)
	if err != nil {
		return stored, fmt.Errorf("stored definitions: %w", err)
	}
	e := a.engine
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.source.Kind == "posthog" {
		return stored, nil // PostHog answered meanwhile
	}
	e.etagValue = stored.ETag
	e.install(defs, sourceInfo{Kind: "storage", Location: a.storageKey(definitionsKey), Loaded: stored.FetchedAt,
		Checksum: checksum(stored.Definitions), ETag: stored.ETag})
	return stored, nil
}

// storageOf returns Caddy's configured storage.
func storageOf(ctx caddy.Context) certmagic.Storage { return ctx.Storage() }

func caddyVersion() string {
	_, full := caddy.Version()
	return full
}

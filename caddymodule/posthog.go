package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

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
	a.serveStoredDefinitions(ctx)
	e := a.engine
	a.poller.Validator = e.etag
	a.poller.Handlers = posthog.Handlers{
		Definitions:  func(body []byte, etag string) error { return a.acceptDefinitions(ctx, body, etag) },
		NotModified:  e.fetched,
		QuotaLimited: a.quotaLimited,
		Unauthorized: func(status int, detail string) {
			msg := fmt.Sprintf("PostHog refused the key (%d): %s", status, detail)
			e.failed(msg)
			a.definitionsFailed(sourcePostHog, errors.New(msg))
			a.logger.Error("PostHog refused the personal API key; the last good flag definitions keep serving. "+
				"Check personal_api_key (needs feature_flag:read) and project_api_key",
				zap.Int("status", status), zap.String("detail", detail))
		},
		Failure: func(err error, consecutive int, retryIn time.Duration) {
			if !errors.As(err, new(refusedDocument)) {
				e.failed(err.Error()) // install recorded and counted a refused document
			}
			a.definitionsFailed(sourcePostHog, err)
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
// malformed flags inside a parseable body are logged and serve false.
func (a *App) acceptDefinitions(ctx context.Context, body []byte, etag string) error {
	res, err := a.engine.install(definitionsSource{kind: sourcePostHog, location: a.PostHog.Host, etag: etag}, body)
	if err != nil {
		return refusedDocument{fmt.Errorf("PostHog sent definitions that do not parse: %w", err)}
	}
	if !res.changed {
		return nil
	}
	for _, p := range res.problems {
		a.logger.Error("malformed flag in PostHog's definitions; it serves false", zap.String("problem", p.String()))
	}
	a.logger.Info("flag definitions updated from PostHog", zap.Int("flags", res.defs.Len()), zap.String("etag", etag))
	a.definitionsRefreshed(res)
	if err := a.storeDefinitions(ctx, body, etag); err != nil {
		a.logger.Warn("keeping a last-known-good copy of the flag definitions", zap.Error(err))
	}
	return nil
}

// refusedDocument is an answer engine.install refused, which it recorded as
// the source's error and counted already.
type refusedDocument struct{ err error }

func (r refusedDocument) Error() string { return r.err.Error() }
func (r refusedDocument) Unwrap() error { return r.err }

// emptyDefinitions is the document that a 402 puts in force.
var emptyDefinitions = []byte(`{"flags": []}`)

func (a *App) quotaLimited(detail string) {
	_, _ = a.engine.install(definitionsSource{kind: sourcePostHog, location: a.PostHog.Host, note: "quota limited: " + detail}, emptyDefinitions)
	definitionsErrors.Inc()
	a.definitionsFailed(sourcePostHog, errors.New("quota limited: "+detail))
	a.logger.Error("PostHog says the project is over its feature flag quota (402); flag definitions dropped, "+
		"every flag serves false and routes to default until the quota allows", zap.String("detail", detail))
}

func (a *App) storeDefinitions(ctx context.Context, body []byte, etag string) error {
	data, err := json.Marshal(storedDefinitions{FetchedAt: a.clock.Now().UTC(), ETag: etag, Host: a.PostHog.Host, Definitions: body})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return a.storage.Store(ctx, a.storageKey(definitionsKey), data)
}

// serveStoredDefinitions puts the last-known-good copy in force, unless
// PostHog's own answer already is (a reload).
func (a *App) serveStoredDefinitions(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	data, err := a.storage.Load(ctx, a.storageKey(definitionsKey))
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	var stored storedDefinitions
	if err == nil {
		err = json.Unmarshal(data, &stored)
	}
	if err != nil {
		a.logger.Warn("reading the last-known-good flag definitions", zap.Error(err))
		return
	}
	res, err := a.engine.install(definitionsSource{kind: sourceStored, location: a.storageKey(definitionsKey),
		etag: stored.ETag, fetchedAt: stored.FetchedAt}, stored.Definitions)
	switch {
	case err != nil:
		a.logger.Warn("the last-known-good flag definitions do not parse", zap.Error(err))
	case res.changed:
		a.logger.Info("serving the last-known-good flag definitions until PostHog answers",
			zap.Time("fetched_at", stored.FetchedAt), zap.Int("flags", res.defs.Len()))
		a.definitionsRefreshed(res)
	}
}

func caddyVersion() string {
	_, full := caddy.Version()
	return full
}

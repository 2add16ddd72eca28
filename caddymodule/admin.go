package caddymodule

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/proxy"
	"github.com/flagsplit/flagsplit/rollout"
)

func init() {
	caddy.RegisterModule(AdminAPI{})
}

// AdminAPI serves flagsplit's endpoints on Caddy's admin listener:
//
//	GET    /feature_flags/                    definitions source, flags, overrides, statistics
//	GET    /feature_flags/evaluate?distinct_id=...&person_properties=<json>&...
//	GET    /feature_flags/overrides           every override
//	PUT    /feature_flags/overrides/<flag>    {"killed": true} | {"rollout_percentage": 25} | {"variant": "control"}
//	DELETE /feature_flags/overrides/<flag>
//	POST   /feature_flags/refresh             fetch definitions now
//	GET    /feature_flags/rollouts            every rollout's state
//	GET    /feature_flags/rollouts/<flag>
//	POST   /feature_flags/rollouts/<flag>/{pause,resume,promote,abort}
type AdminAPI struct{}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.feature_flags",
		New: func() caddy.Module { return new(AdminAPI) },
	}
}

// Routes returns the admin routes.
func (AdminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: "/feature_flags/", Handler: caddy.AdminHandlerFunc(serveAdmin)}}
}

// maxOverrideBody bounds the body of PUT /feature_flags/overrides/<flag>:
// an override is one small object, so anything larger is refused (413)
// rather than read.
const maxOverrideBody = 64 << 10

// decodeBody decodes r's body, at most limit bytes, as exactly one JSON
// value into v, refusing fields v lacks. A body over the limit is answered
// 413; an empty one, one that is not what shape describes, or one with
// anything but white space after its value, 400.
func decodeBody(w http.ResponseWriter, r *http.Request, limit int64, v any, shape string) error {
	if r.ContentLength > limit {
		return apiError(http.StatusRequestEntityTooLarge, "body is %d bytes; the limit is %d", r.ContentLength, limit)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if tooBig := (*http.MaxBytesError)(nil); errors.As(err, &tooBig) {
		return apiError(http.StatusRequestEntityTooLarge, "body is larger than the limit of %d bytes", limit)
	}
	if err != nil {
		return apiError(http.StatusBadRequest, "reading body: %v", err)
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return apiError(http.StatusBadRequest, "body is empty: it must be %s", shape)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return apiError(http.StatusBadRequest, "body must be %s: %v", shape, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return apiError(http.StatusBadRequest, "body must be exactly one JSON value (%s); found more after it at byte %d", shape, dec.InputOffset())
	}
	return nil
}

func apiError(status int, format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	return caddy.APIError{HTTPStatus: status, Err: err, Message: err.Error()}
}

// currentApp finds the running config's feature_flags app. The admin router is
// built before apps are provisioned, so it is looked up per request.
func currentApp() (*App, error) {
	app, err := caddy.ActiveContext().AppIfConfigured("feature_flags")
	if err != nil {
		return nil, apiError(http.StatusNotFound, "the feature_flags app is not configured")
	}
	return app.(*App), nil
}

func serveAdmin(w http.ResponseWriter, r *http.Request) error {
	app, err := currentApp()
	if err != nil {
		return err
	}
	path := strings.TrimPrefix(r.URL.Path, "/feature_flags")
	path = strings.Trim(path, "/")
	parts := strings.Split(path, "/")
	switch {
	case path == "":
		if err := allow(w, r, http.MethodGet); err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, app.status(app.clock.Now()))
	case path == "evaluate":
		if err := allow(w, r, http.MethodGet); err != nil {
			return err
		}
		return app.serveEvaluate(w, r)
	case path == "refresh":
		if err := allow(w, r, http.MethodPost); err != nil {
			return err
		}
		outcome, err := app.refresh(r.Context())
		if err != nil {
			return apiError(http.StatusBadGateway, "refreshing definitions: %v", err)
		}
		return writeJSON(w, http.StatusOK, map[string]any{"outcome": outcome, "flags": app.engine.definitions().Len()})
	case path == "overrides":
		if err := allow(w, r, http.MethodGet); err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, app.engine.snapshot().overrides)
	case parts[0] == "overrides" && len(parts) == 2 && parts[1] != "":
		return app.serveOverride(w, r, parts[1])
	case path == "rollouts":
		if err := allow(w, r, http.MethodGet); err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, app.rolloutStatuses())
	case parts[0] == "rollouts" && len(parts) == 2 && parts[1] != "":
		if err := allow(w, r, http.MethodGet); err != nil {
			return err
		}
		run := app.engine.rollouts.InForce().Run(parts[1])
		if run == nil {
			return apiError(http.StatusNotFound, "no rollout is configured for flag %q", parts[1])
		}
		return writeJSON(w, http.StatusOK, rolloutStatusOf(run))
	case parts[0] == "rollouts" && len(parts) == 3:
		if err := allow(w, r, http.MethodPost); err != nil {
			return err
		}
		switch parts[2] {
		case "pause", "resume", "promote", "abort":
		default:
			return apiError(http.StatusNotFound, "unknown rollout action %q (pause, resume, promote or abort)", parts[2])
		}
		return app.serveRolloutAction(w, r, parts[1], parts[2])
	}
	return apiError(http.StatusNotFound, "no such endpoint: %s", r.URL.Path)
}

// allow refuses a request whose method is not one of methods, with a 405
// that lists them (in its Allow header too).
func allow(w http.ResponseWriter, r *http.Request, methods ...string) error {
	if slices.Contains(methods, r.Method) {
		return nil
	}
	w.Header().Set("Allow", strings.Join(methods, ", "))
	list := methods[0]
	if n := len(methods); n > 1 {
		list = strings.Join(methods[:n-1], ", ") + " or " + methods[n-1]
	}
	return apiError(http.StatusMethodNotAllowed, "method %s not allowed (use %s)", r.Method, list)
}

func writeJSON(w http.ResponseWriter, status int, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (a *App) serveOverride(w http.ResponseWriter, r *http.Request, key string) error {
	switch r.Method {
	case http.MethodGet:
		o, ok := a.engine.overrides.Value().get(key)
		if !ok {
			return apiError(http.StatusNotFound, "flag %q has no override", key)
		}
		return writeJSON(w, http.StatusOK, o)
	case http.MethodPut:
		var o eval.Override
		if err := decodeBody(w, r, maxOverrideBody, &o, `a JSON object such as {"killed": true}, {"rollout_percentage": 25} or {"variant": "control"}`); err != nil {
			return err
		}
		ch, err := a.setOverride(r.Context(), key, &o, nil)
		switch {
		case errors.Is(err, errUnknownFlag):
			return apiError(http.StatusNotFound, "%v", err)
		case errors.Is(err, errInvalidOverride):
			return apiError(http.StatusBadRequest, "%v", err)
		case err != nil:
			return apiError(http.StatusServiceUnavailable, "%v", err)
		}
		a.overrideChanged(ch, "admin "+r.RemoteAddr)
		return writeJSON(w, http.StatusOK, map[string]any{"flag": key, "override": o})
	case http.MethodDelete:
		ch, err := a.setOverride(r.Context(), key, nil, nil)
		switch {
		case errors.Is(err, errNoOverride):
			return apiError(http.StatusNotFound, "flag %q has no override", key)
		case err != nil:
			return apiError(http.StatusServiceUnavailable, "%v", err)
		}
		a.overrideChanged(ch, "admin "+r.RemoteAddr)
		return writeJSON(w, http.StatusOK, map[string]any{"flag": key, "deleted": true})
	}
	return allow(w, r, http.MethodGet, http.MethodPut, http.MethodDelete)
}

func (a *App) serveRolloutAction(w http.ResponseWriter, r *http.Request, key, action string) error {
	run, err := a.engine.rollouts.Act(r.Context(), key, action, a.rolloutHooks())
	if err != nil {
		switch {
		case errors.Is(err, rollout.ErrNoRollout):
			return apiError(http.StatusNotFound, "no rollout is configured for flag %q", key)
		case errors.Is(err, rollout.ErrUnknownAction):
			return apiError(http.StatusBadRequest, "%v", err)
		case errors.Is(err, rollout.ErrInvalidTransition):
			return apiError(http.StatusConflict, "%v", err)
		}
		return apiError(http.StatusServiceUnavailable, "%v", err)
	}
	return writeJSON(w, http.StatusOK, rolloutStatusOf(run))
}

// serveEvaluate answers what this proxy would answer for a subject, with reasons.
func (a *App) serveEvaluate(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	if q.Get("distinct_id") == "" {
		return apiError(http.StatusBadRequest, "distinct_id is required")
	}
	subj, err := subjectFromJSON(subjectJSON{
		distinctID: q.Get("distinct_id"), deviceID: q.Get("device_id"),
		person: q.Get("person_properties"), groups: q.Get("groups"), groupProps: q.Get("group_properties"),
	}, "")
	if err != nil {
		return apiError(http.StatusBadRequest, "%v", err)
	}
	results := evaluateFlags(a.engine.definitions(), &subj, q["flag"])
	return writeJSON(w, http.StatusOK, map[string]any{"distinct_id": subj.DistinctID, "results": results})
}

// adminStatus is GET /feature_flags/.
type adminStatus struct {
	Ready      bool                     `json:"ready"`
	Source     sourceInfo               `json:"source"`
	LastFetch  *time.Time               `json:"last_successful_fetch,omitempty"`
	FlagCount  int                      `json:"flag_count"`
	Generation uint64                   `json:"generation"`
	Cache      cacheStatus              `json:"cache"`
	Events     *eventsStatus            `json:"events,omitempty"`
	StaleAfter string                   `json:"stale_after"`
	StaleFlags []string                 `json:"stale_flags"`
	Overrides  map[string]eval.Override `json:"overrides"`
	// InvalidOverrides are the stored overrides kept out of force because
	// the definitions in force cannot take them, with why.
	InvalidOverrides map[string]invalidOverride `json:"invalid_overrides,omitempty"`
	// OverridesRevision is the revision of the shared overrides document
	// in force (0 before any was written).
	OverridesRevision uint64       `json:"overrides_revision"`
	Flags             []flagStatus `json:"flags"`
}

type cacheStatus struct {
	Size    int    `json:"size"`
	Entries int    `json:"entries"`
	Hits    uint64 `json:"hits"`
	Misses  uint64 `json:"misses"`
}

type flagStatus struct {
	Key      string         `json:"key"`
	ID       int64          `json:"id,omitempty"`
	Version  int64          `json:"version,omitempty"`
	Active   bool           `json:"active"`
	Variants []string       `json:"variants,omitempty"`
	Override *eval.Override `json:"override,omitempty"`
	// InvalidOverride is the flag's stored override when it is not in
	// force because the flag cannot take it.
	InvalidOverride *invalidOverride     `json:"invalid_override,omitempty"`
	Rollout         *rolloutStatus       `json:"rollout,omitempty"`
	Local           string               `json:"local"`
	LocalDetail     []string             `json:"local_detail,omitempty"`
	Activity        flagActivity         `json:"activity"`
	VariantStats    []proxy.VariantStats `json:"variant_stats,omitempty"`
}

func (a *App) status(now time.Time) adminStatus {
	e := a.engine
	defs := e.definitions()
	snap := e.snapshot()
	st := adminStatus{Ready: snap.ready, Source: snap.source, Overrides: snap.overrides, OverridesRevision: snap.overridesRevision,
		InvalidOverrides: snap.invalidOverrides}
	if !snap.lastFetch.IsZero() {
		t := snap.lastFetch
		st.LastFetch = &t
	}
	st.FlagCount, st.Generation = defs.Len(), defs.Generation()
	hits, misses, entries := e.cache.Stats()
	st.Cache = cacheStatus{Size: *a.CacheSize, Entries: entries, Hits: hits, Misses: misses}
	st.Events = a.eventsStatus()
	staleAfter := time.Duration(a.StaleAfter)
	st.StaleAfter = staleAfter.String()
	st.StaleFlags = []string{}

	warnings := map[string][]string{}
	for _, w := range defs.Warnings() {
		warnings[w.Flag] = append(warnings[w.Flag], w.Path+": "+w.Message)
	}
	stats := map[string][]proxy.VariantStats{}
	for _, s := range e.outcomes.Snapshot() {
		stats[s.Flag] = append(stats[s.Flag], s)
	}
	for _, f := range defs.Flags() {
		fs := flagStatus{Key: f.Key, ID: f.ID, Version: f.Version, Active: f.Active, Variants: f.Variants(),
			Override: f.Override(), Local: "yes", VariantStats: stats[f.Key]}
		switch never := f.NeverLocal(); {
		case never != "":
			fs.Local, fs.LocalDetail = "never", []string{never}
		case len(warnings[f.Key]) > 0:
			fs.Local, fs.LocalDetail = "partly", warnings[f.Key]
		}
		if bad, ok := snap.invalidOverrides[f.Key]; ok {
			fs.InvalidOverride = &bad
		}
		if run := e.rollouts.InForce().Run(f.Key); run != nil {
			rs := rolloutStatusOf(run)
			fs.Rollout = &rs
		}
		fs.Activity = e.activity.status(f.Key, now, staleAfter)
		if fs.Activity.Stale {
			st.StaleFlags = append(st.StaleFlags, f.Key)
		}
		st.Flags = append(st.Flags, fs)
	}
	return st
}

// Interface guards.
var _ caddy.AdminRouter = (*AdminAPI)(nil)

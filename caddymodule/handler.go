package caddymodule

import (
	"fmt"
	"net/http"
	"net/textproto"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/proxy"
	"github.com/flagsplit/flagsplit/rollout"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Handler evaluates feature flags for each request: it resolves the distinct id,
// evaluates the flags (through the result cache), removes any flagsplit header
// the client sent (in every spelling a backend folds, and from the Connection
// header), adds X-PostHog-Distinct-Id and the flags in the configured header
// form (X-Feature-Flag-<flag> per flag, one X-Feature-Flags dictionary, or
// none) for the upstream, and makes the results available to matchers, the
// feature_flag selection policy and placeholders.
//
// Placeholders set:
//
// Placeholder | Description
// ------------|-------------
// `{feature_flags.distinct_id}` | The resolved distinct id
// `{feature_flags.<flag>}` | The flag's value: `true`, `false` or the variant
// `{feature_flags.<flag>.payload}` | The payload for that value, as JSON
type Handler struct {
	// DistinctID lists where to look for the distinct id, in order. Default:
	// the X-POSTHOG-DISTINCT-ID header, then the posthog-js cookie.
	DistinctID []IdentitySource `json:"distinct_id,omitempty"`

	// AssignCookie controls whether a request without an id gets one, set in a
	// cookie (posthog-js's own when a project key is configured, so the browser
	// SDK adopts it; flagsplit_id otherwise). Default: true.
	AssignCookie *bool `json:"assign_cookie,omitempty"`

	// CookieDomain is the Domain attribute of an assigned cookie; set it to
	// the site's registrable domain to share the id across subdomains.
	CookieDomain string `json:"cookie_domain,omitempty"`

	// CookieMaxAge is how long an assigned cookie lives. Default: 365 days,
	// as posthog-js.
	CookieMaxAge caddy.Duration `json:"cookie_max_age,omitempty"`

	// PersonProperties maps person property names to values with placeholders,
	// e.g. {"plan": "{http.request.header.X-Plan}"}. An empty value leaves the
	// property out (flags that need it are then inconclusive).
	PersonProperties map[string]string `json:"person_properties,omitempty"`

	// Groups maps group types (as in PostHog's group_type_mapping) to the
	// group key, with placeholders.
	Groups map[string]string `json:"groups,omitempty"`

	// GroupProperties maps a group type to its properties, with placeholders.
	GroupProperties map[string]map[string]string `json:"group_properties,omitempty"`

	// Flags restricts evaluation to these flag keys. Default: every flag.
	Flags []string `json:"flags,omitempty"`

	// Headers is how the flags reach the upstream: "per_flag" (default),
	// one X-Feature-Flag-<flag key> header per flag; "dictionary", one
	// X-Feature-Flags structured-field dictionary; "off", none (matchers,
	// lb_policy and placeholders still work). X-PostHog-Distinct-Id is
	// sent in every form.
	Headers string `json:"headers,omitempty"`

	app        *App
	logger     *zap.Logger
	resolver   *proxy.Resolver
	cookieOpts proxy.CookieOptions
	person     []valueSource
	groups     []groupSource
	selection  *eval.Selection
	bound      *atomic.Pointer[boundSet]
	headerMode proxy.HeaderMode
	// sendsHeaders is set for a handler of the config (not the app's
	// implicit one, which sets no headers): only it warns about them.
	sendsHeaders bool
	warned       *headerWarnings
	// identity and malformed are the identity counters by source kind,
	// resolved once.
	identity  [proxy.SourceAssigned + 1]prometheus.Counter
	malformed [proxy.SourceAssigned + 1]prometheus.Counter
}

// IdentitySource is one place to look for the distinct id.
type IdentitySource struct {
	// Source is "header", "cookie" or "placeholder".
	Source string `json:"source"`
	// Name is the header name, the cookie name ("posthog" for the posthog-js
	// cookie) or the placeholder.
	Name string `json:"name"`
}

type valueSource struct {
	name string
	// value is the configured text; key is set when it is exactly one
	// placeholder, which is then read directly instead of parsed per request.
	value string
	key   string
	// header is set when the placeholder is a request header: it is read from
	// the request directly, as Caddy's replacer would, but without boxing the
	// string into an interface (an allocation per property per request).
	header string
}

type groupSource struct {
	typ   string
	key   valueSource
	props []valueSource
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.feature_flags",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets up the handler.
func (h *Handler) Provision(ctx caddy.Context) error {
	appVal, err := ctx.App("feature_flags")
	if err != nil {
		return fmt.Errorf("feature_flags app: %w", err)
	}
	app := appVal.(*App)
	if err := h.setup(app, ctx.Logger()); err != nil {
		return err
	}
	h.sendsHeaders = true
	for _, f := range h.Flags {
		app.reference(flagReference{flag: f, where: "feature_flags flags"})
	}
	if app.engine.snapshot().ready {
		// Header problems are logged at load; those of later definitions
		// when the first request binds them.
		hw, collisions := proxy.NewHeaderWriter(h.headerMode, h.selection.For(app.engine.definitions()).Keys())
		h.warnHeaders(hw, collisions)
	}
	return nil
}

// setup prepares a handler for an app (also used for the app's implicit
// handler that serves matchers and policies on sites without the directive).
func (h *Handler) setup(app *App, logger *zap.Logger) error {
	h.app, h.logger = app, logger
	h.bound = new(atomic.Pointer[boundSet])
	h.warned = &headerWarnings{reported: map[string]bool{}}
	mode, err := proxy.ParseHeaderMode(h.Headers)
	if err != nil {
		return err
	}
	h.headerMode = mode
	for k := range h.identity {
		h.identity[k] = identityTotal.WithLabelValues(proxy.SourceKind(k).String())
		h.malformed[k] = malformedIdentityTotal.WithLabelValues(proxy.SourceKind(k).String())
	}
	sources := make([]proxy.Source, 0, len(h.DistinctID))
	for _, s := range h.DistinctID {
		src, err := s.toSource()
		if err != nil {
			return err
		}
		sources = append(sources, src)
	}
	assign := h.AssignCookie == nil || *h.AssignCookie
	h.resolver = proxy.NewResolver(sources, app.ProjectAPIKey(), assign)
	h.cookieOpts = proxy.CookieOptions{Domain: h.CookieDomain, MaxAge: time.Duration(h.CookieMaxAge)}
	if h.CookieMaxAge < 0 {
		return fmt.Errorf("cookie_max_age must be positive")
	}

	h.person = valueSources(h.PersonProperties)
	groupTypes := make([]string, 0, len(h.Groups))
	for typ := range h.Groups {
		groupTypes = append(groupTypes, typ)
	}
	for typ := range h.GroupProperties {
		if _, ok := h.Groups[typ]; !ok {
			return fmt.Errorf("group_property for group type %q without a group %s line giving its key", typ, typ)
		}
	}
	sort.Strings(groupTypes)
	h.groups = make([]groupSource, len(groupTypes))
	for i, typ := range groupTypes {
		h.groups[i] = groupSource{typ: typ, key: newValueSource("", h.Groups[typ]), props: valueSources(h.GroupProperties[typ])}
	}
	for _, f := range h.Flags {
		if f == "" {
			return fmt.Errorf("empty flag key in flags")
		}
	}
	var keys []string
	if len(h.Flags) > 0 {
		keys = h.Flags
	}
	h.selection = eval.NewSelection(keys)
	return nil
}

func (s IdentitySource) toSource() (proxy.Source, error) {
	switch s.Source {
	case "header":
		if s.Name == "" {
			return proxy.Source{}, fmt.Errorf("distinct_id header: a header name is required")
		}
		return proxy.Source{Kind: proxy.SourceHeader, Name: s.Name}, nil
	case "cookie":
		if s.Name == "" {
			return proxy.Source{}, fmt.Errorf("distinct_id cookie: a cookie name (or posthog) is required")
		}
		if s.Name == "posthog" {
			return proxy.Source{Kind: proxy.SourcePostHogCookie}, nil
		}
		return proxy.Source{Kind: proxy.SourceCookie, Name: s.Name}, nil
	case "placeholder":
		if s.Name == "" {
			return proxy.Source{}, fmt.Errorf("distinct_id placeholder: a placeholder is required")
		}
		return proxy.Source{Kind: proxy.SourcePlaceholder, Name: s.Name}, nil
	}
	return proxy.Source{}, fmt.Errorf("unknown distinct_id source %q (want header, cookie or placeholder)", s.Source)
}

func valueSources(m map[string]string) []valueSource {
	out := make([]valueSource, 0, len(m))
	for name, value := range m {
		out = append(out, newValueSource(name, value))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

const requestHeaderPlaceholder = "http.request.header."

func newValueSource(name, value string) valueSource {
	vs := valueSource{name: name, value: value}
	if strings.HasPrefix(value, "{") && strings.HasSuffix(value, "}") && strings.Count(value, "{") == 1 {
		vs.key = value[1 : len(value)-1]
		if field, ok := strings.CutPrefix(vs.key, requestHeaderPlaceholder); ok && field != "" {
			vs.header = textproto.CanonicalMIMEHeaderKey(field)
		}
	}
	return vs
}

func (vs *valueSource) resolve(r *http.Request, repl *caddy.Replacer) string {
	switch {
	case vs.header != "":
		// Same value as the placeholder: all the field's values, comma-joined.
		switch vals := r.Header[vs.header]; len(vals) {
		case 0:
			return ""
		case 1:
			return vals[0]
		default:
			return strings.Join(vals, ",")
		}
	case vs.key != "":
		v, _ := repl.GetString(vs.key)
		return v
	}
	return repl.ReplaceAll(vs.value, "")
}

// boundSet is the handler's flag selection bound to one definitions generation,
// with everything per-flag the request path needs prepared once.
type boundSet struct {
	defs     *eval.Definitions
	fs       *eval.FlagSet
	index    map[string]int
	headers  *proxy.HeaderWriter
	counters []flagCounters
	lastSeen []*atomic.Int64
	// metrics[i][v] are flag i's routed-request series for value index v
	// (see eval.Results.ValueIndex).
	metrics [][]valueMetrics
	// rollouts are the selected flags with a rollout in force, whose ramps
	// see every response.
	rollouts []boundRollout
}

type boundRollout struct {
	index int
	run   *rollout.Run
	// share is the share of matching users the flag, as defined in this
	// generation (rollout caps included), puts on the new side; NaN when no
	// single share holds (see eval.Flag.TreatmentShare).
	share float64
}

// bind returns the flag selection for the definitions in force.
func (h *Handler) bind(defs *eval.Definitions) *boundSet {
	if b := h.bound.Load(); b != nil && b.defs == defs {
		return b
	}
	fs := h.selection.For(defs)
	b := &boundSet{defs: defs, fs: fs, index: make(map[string]int, fs.Len())}
	var collisions []proxy.HeaderCollision
	b.headers, collisions = proxy.NewHeaderWriter(h.headerMode, fs.Keys())
	if h.sendsHeaders {
		h.warnHeaders(b.headers, collisions)
	}
	b.counters = make([]flagCounters, fs.Len())
	b.lastSeen = make([]*atomic.Int64, fs.Len())
	b.metrics = make([][]valueMetrics, fs.Len())
	for i, key := range fs.Keys() {
		b.index[key] = i
		values := fs.Values(i)
		b.counters[i] = newFlagCounters(key, values)
		b.lastSeen[i] = h.app.engine.activity.cell(key)
		b.metrics[i] = make([]valueMetrics, len(values))
		for v, value := range values {
			b.metrics[i][v].flag, b.metrics[i][v].value = key, value
		}
		// The rollouts in force change only with a new definitions
		// generation (installing them re-applies overrides), so the run can
		// be bound here; its ramp, which a restart replaces, is loaded per
		// request.
		if run := h.app.engine.rollouts.InForce().Run(key); run != nil {
			b.rollouts = append(b.rollouts, boundRollout{index: i, run: run, share: treatmentShare(defs, key)})
		}
	}
	h.bound.Store(b)
	return b
}

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	st := h.evaluate(r, repl, false)
	if st.cookie != nil {
		http.SetCookie(w, st.cookie)
	}
	st.bound.headers.Apply(r, st.identity.DistinctID, st.results.Value, &st.headerScratch)
	st.countEvaluations()

	st.recorder.ResponseWriter = w
	start := time.Now()
	err := next.ServeHTTP(&st.recorder, r)
	st.observe(err, time.Since(start), repl)
	return err
}

// evaluate resolves the identity, evaluates the flags and attaches the result to
// the request (vars and placeholders). implicit is set for a matcher or
// policy evaluating on a site without the directive: no identity is minted
// there (no response carries a cookie), and no response is observed.
func (h *Handler) evaluate(r *http.Request, repl *caddy.Replacer, implicit bool) *requestState {
	st := &requestState{handler: h, implicit: implicit}
	assign := !implicit
	st.recorder.state = st
	var malformed proxy.SourceSet
	st.identity, malformed = h.resolver.Resolve(r, repl)
	if malformed != 0 {
		for k := range h.malformed {
			if kind := proxy.SourceKind(k); malformed.Has(kind) {
				h.malformed[k].Inc()
				if c := h.logger.Check(zapcore.DebugLevel, "malformed identity ignored"); c != nil {
					c.Write(zap.String("source", kind.String()))
				}
			}
		}
	}
	if st.identity.DistinctID == "" && assign && h.resolver.Assigns() {
		id, cookie, err := h.resolver.Assign(h.cookieOptions(r))
		switch {
		case err != nil:
			h.logger.Error("assigning a distinct id", zap.Error(err))
		case h.resolver.HoldsAssignCookie(r):
			// The request carries the cookie the id would be stored in,
			// and it could not be read (a posthog-js cookie flagsplit
			// cannot parse, or an id it refuses). Writing over it would
			// erase the user's posthog-js identity: the id serves this
			// request only.
			st.identity = id
			if c := h.logger.Check(zapcore.DebugLevel, "unreadable identity cookie kept; id assigned for this request only"); c != nil {
				c.Write(zap.String("cookie", h.resolver.AssignCookieName()))
			}
		default:
			st.identity, st.cookie = id, cookie
		}
	}
	h.identity[st.identity.Source].Inc()

	st.subject.DistinctID = st.identity.DistinctID
	st.subject.DeviceID = st.identity.DeviceID
	if len(h.person) > 0 {
		st.subject.Person = h.properties(h.person, r, repl, st.personInline[:0])
	}
	for i := range h.groups {
		g := &h.groups[i]
		key := g.key.resolve(r, repl)
		if key == "" {
			continue
		}
		if st.subject.Groups == nil {
			st.subject.Groups = make([]eval.Group, 0, len(h.groups))
		}
		st.subject.Groups = append(st.subject.Groups, eval.Group{Type: g.typ, Key: key, Properties: h.properties(g.props, r, repl, nil)})
	}

	defs := h.app.engine.definitions()
	st.bound = h.bind(defs)
	h.app.engine.cache.Evaluate(st.bound.fs, &st.subject, &st.results)

	caddyhttp.SetVar(r.Context(), stateVarKey, st)
	repl.Map(st.placeholder)
	return st
}

// headerWarnings are the header problems a handler has logged, each once.
type headerWarnings struct {
	mu       sync.Mutex
	reported map[string]bool
}

// warnHeaders logs, once each, the flags whose per-flag headers collide and
// a per-flag header count past proxy.ManyFlagHeaders when no flags line
// limits it (live definitions can grow past it at any time).
func (h *Handler) warnHeaders(hw *proxy.HeaderWriter, collisions []proxy.HeaderCollision) {
	once := func(key string) bool {
		h.warned.mu.Lock()
		defer h.warned.mu.Unlock()
		seen := h.warned.reported[key]
		h.warned.reported[key] = true
		return !seen
	}
	for _, c := range collisions {
		if once("collision " + c.String()) {
			h.logger.Warn("flag keys collide as header names; those flags get no per-flag header",
				zap.Strings("flags", c.Keys), zap.String("header", c.Header), zap.String("problem", c.String()))
		}
	}
	if n := hw.FlagHeaders(); n > proxy.ManyFlagHeaders && len(h.Flags) == 0 && once("many") {
		h.logger.Warn(manyHeadersMessage(n), zap.Int("flag_headers", n), zap.Int("threshold", proxy.ManyFlagHeaders))
	}
}

// manyHeadersMessage is the advice for a per-flag header count past
// proxy.ManyFlagHeaders.
func manyHeadersMessage(n int) string {
	return fmt.Sprintf("every request gets %d X-Feature-Flag-* headers (more than %d): backends may refuse requests with that many headers (431) "+
		"and each one costs proxy and backend time; list the flags the backends read in `flags`, or send them all in one header with `headers dictionary`",
		n, proxy.ManyFlagHeaders)
}

func (h *Handler) properties(sources []valueSource, r *http.Request, repl *caddy.Replacer, dst eval.Properties) eval.Properties {
	for i := range sources {
		if v := sources[i].resolve(r, repl); v != "" {
			dst = append(dst, eval.Property{Key: sources[i].name, Value: eval.String(v)})
		}
	}
	return dst
}

func (h *Handler) cookieOptions(r *http.Request) proxy.CookieOptions {
	opts := h.cookieOpts
	opts.Secure = r.TLS != nil
	return opts
}

// Interface guards.
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)

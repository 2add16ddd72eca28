package caddymodule

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/flagsapi"
	"github.com/flagsplit/flagsplit/posthog"
	"github.com/flagsplit/flagsplit/proxy"
)

func init() {
	caddy.RegisterModule(PostHogFlags{})
}

// PostHogFlags answers posthog-js's flags requests at the edge, with the same
// evaluation (definitions, overrides, kill switches, rollout caps) that routes
// the site's requests, so the browser and the upstream see the same values and
// no page view pays for, or waits on, a call to PostHog. It belongs on the
// route where the site proxies PostHog for posthog-js (PostHog's documented
// reverse proxy):
//
//	handle_path /ingest/* {
//		posthog_flags
//		reverse_proxy https://us.i.posthog.com
//	}
//
// It answers POST /flags (the v=2 shape with per-flag details, or the legacy
// one without v) and POST /decide (in the shape its v asks for), whatever
// body encoding posthog-js used. Every other request, and a flags request
// for another project (its token is not the configured project key), one
// whose body cannot be decoded, or one that arrives before any definitions
// are in force, goes to the next handler unchanged.
//
// Flags the edge cannot decide are asked of PostHog in one call when the app
// has a posthog block (the answers the edge decided are kept); without one
// they are served false with reason edge_inconclusive and
// errorsWhileComputingFlags set, which is what the proxy routes them as.
type PostHogFlags struct {
	// FillTimeout bounds the call to PostHog that fills in the flags the
	// edge cannot decide; when it runs out they are served false. Default:
	// 2s (posthog-js gives up on a flags request after 3s).
	FillTimeout caddy.Duration `json:"fill_timeout,omitempty"`

	app    *App
	logger *zap.Logger
	client *posthog.Client // nil without a posthog block: no fill-in
	all    *atomic.Pointer[eval.FlagSet]
	pool   *sync.Pool
	// requests[endpoint][answer] and answers[source] are the endpoint's
	// counters, resolved once.
	requests [2][answerCount]prometheus.Counter
	answers  [sourceCount]prometheus.Counter
}

// The endpoints, as metric labels.
const (
	endpointFlags = iota
	endpointDecide
)

var endpointNames = [...]string{"flags", "decide"}

// How a flags request was answered, as metric labels.
const (
	// answerLocal: every flag was decided at the edge.
	answerLocal = iota
	// answerFilled: PostHog filled in the flags the edge could not decide.
	answerFilled
	// answerFillFailed: the fill-in call failed; those flags were served
	// false.
	answerFillFailed
	// answerInconclusive: no posthog block; undecided flags served false.
	answerInconclusive
	// answerPassed: not answered here (another project's token, a body
	// that does not decode, no definitions in force yet); the next handler
	// had it.
	answerPassed
	// answerInvalid: refused as PostHog refuses it (no distinct_id).
	answerInvalid
	answerCount
)

var answerNames = [...]string{"local", "filled", "fill_failed", "inconclusive", "passed", "invalid"}

// Where a served flag's answer came from, as metric labels.
const (
	sourceLocal = iota
	sourcePostHogFill
	sourceServedFalse
	sourceCount
)

var sourceNames = [...]string{"local", "posthog", "inconclusive"}

// defaultFillTimeout leaves posthog-js (3s by default) time to get the answer.
const defaultFillTimeout = 2 * time.Second

// flagsScratch is one request's reusable storage.
type flagsScratch struct {
	body    bytes.Buffer
	out     []byte
	flags   []flagsapi.Flag
	missing []int
	results eval.Results
}

// CaddyModule returns the Caddy module information.
func (PostHogFlags) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.posthog_flags",
		New: func() caddy.Module { return new(PostHogFlags) },
	}
}

// Provision sets up the handler.
func (h *PostHogFlags) Provision(ctx caddy.Context) error {
	appVal, err := ctx.App("feature_flags")
	if err != nil {
		return fmt.Errorf("feature_flags app: %w", err)
	}
	return h.setup(appVal.(*App), ctx.Logger())
}

// setup prepares the handler for an app.
func (h *PostHogFlags) setup(app *App, logger *zap.Logger) error {
	h.app, h.logger = app, logger
	if h.FillTimeout < 0 {
		return errors.New("posthog_flags: fill_timeout must be positive")
	}
	if h.FillTimeout == 0 {
		h.FillTimeout = caddy.Duration(defaultFillTimeout)
	}
	if app.poller != nil {
		c := *app.poller.Client
		c.Timeout = time.Duration(h.FillTimeout)
		h.client = &c
	}
	h.all = new(atomic.Pointer[eval.FlagSet])
	h.pool = &sync.Pool{New: func() any { return new(flagsScratch) }}
	for e := range h.requests {
		for a := range h.requests[e] {
			h.requests[e][a] = postHogFlagsRequests.WithLabelValues(endpointNames[e], answerNames[a])
		}
	}
	for s := range h.answers {
		h.answers[s] = postHogFlagsAnswers.WithLabelValues(sourceNames[s])
	}
	return nil
}

func parsePostHogFlags(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(PostHogFlags)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	posthog_flags [<matcher>] {
//		fill_timeout <duration>
//	}
func (h *PostHogFlags) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "fill_timeout":
			if !d.NextArg() {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(d.Val())
			if err != nil {
				return d.Errf("fill_timeout: %v", err)
			}
			if dur <= 0 {
				return d.Errf("fill_timeout must be positive, got %s", d.Val())
			}
			h.FillTimeout = caddy.Duration(dur)
			if d.NextArg() {
				return d.ArgErr()
			}
		default:
			return d.Errf("unknown posthog_flags option %q", d.Val())
		}
	}
	return nil
}

// flagsEndpoint recognises the paths posthog-js asks for flags on (after
// handle_path has stripped the proxy's prefix).
func flagsEndpoint(path string) (int, bool) {
	switch strings.TrimSuffix(path, "/") {
	case "/flags":
		return endpointFlags, true
	case "/decide":
		return endpointDecide, true
	}
	return 0, false
}

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (h *PostHogFlags) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	endpoint, ok := flagsEndpoint(r.URL.Path)
	if !ok || r.Method != http.MethodPost {
		return next.ServeHTTP(w, r)
	}
	sc := h.pool.Get().(*flagsScratch)
	defer h.pool.Put(sc)
	sc.body.Reset()
	if _, err := sc.body.ReadFrom(io.LimitReader(r.Body, flagsapi.MaxBodySize+1)); err != nil {
		return caddyhttp.Error(http.StatusBadRequest, fmt.Errorf("reading flags request: %w", err))
	}
	if sc.body.Len() > flagsapi.MaxBodySize {
		return caddyhttp.Error(http.StatusRequestEntityTooLarge, flagsapi.ErrBodyTooLarge)
	}
	query := r.URL.Query()
	req, enc, err := flagsapi.Decode(query, r.Header.Get("Content-Type"), sc.body.Bytes())
	if err != nil {
		h.logger.Debug("flags request not decoded; passed on", zap.String("encoding", enc.String()), zap.Error(err))
		return h.pass(w, r, next, endpoint, sc.body.Bytes())
	}
	if key := h.app.ProjectAPIKey(); key != "" && req.Token != key {
		return h.pass(w, r, next, endpoint, sc.body.Bytes())
	}
	// Before any definitions are in force the edge knows no flag: PostHog
	// answers (checked only when the definitions are empty, so the usual
	// path takes no lock).
	if h.app.engine.definitions().Len() == 0 && !h.app.engine.snapshot().ready {
		return h.pass(w, r, next, endpoint, sc.body.Bytes())
	}
	if req.DistinctID == "" && !req.DisableFlags {
		h.requests[endpoint][answerInvalid].Inc()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		_, err := w.Write([]byte(`{"type":"validation_error","code":"invalid_request","detail":"distinct_id is required"}`))
		return err
	}

	answer := h.evaluate(r, &req, sc)
	h.requests[endpoint][answer].Inc()

	resp := flagsapi.Response{Flags: sc.flags, RequestID: uuid.NewString(), EvaluatedAt: h.app.clock.Now().UnixMilli()}
	for i := range sc.flags {
		if sc.flags[i].Failed || sc.flags[i].Reason == flagsapi.ReasonEdgeInconclusive {
			resp.ErrorsWhileComputingFlags = true
			break
		}
	}
	format := flagsapi.FormatFor(endpoint == endpointDecide, query.Get("v"))
	sc.out = resp.Append(sc.out[:0], format)
	if endpoint == endpointDecide || query.Get("config") == "true" {
		sc.out = appendFallbackConfig(sc.out)
	}
	hdr := w.Header()
	hdr.Set("Content-Type", "application/json")
	hdr.Set("Cache-Control", "no-store")
	_, err = w.Write(sc.out)
	return err
}

// fallbackConfig is the remote config PostHog's own flags service answers
// when it has none at hand: features that need PostHog's config stay off.
// Only requests that ask for config get it (/decide, /flags?config=true);
// current posthog-js takes its config from /array/<token>/config, which
// goes to PostHog.
const fallbackConfig = `,"supportedCompression":["gzip","gzip-js"],"sessionRecording":false,"surveys":false,"heatmaps":false,"capturePerformance":false,"autocaptureExceptions":false,"isAuthenticated":false,"toolbarParams":{},"siteApps":[],"config":{"enable_collect_everything":true}}`

func appendFallbackConfig(out []byte) []byte {
	if n := len(out); n > 0 && out[n-1] == '}' {
		return append(out[:n-1], fallbackConfig...)
	}
	return out
}

// pass hands the request, with its body, to the next handler.
func (h *PostHogFlags) pass(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, endpoint int, body []byte) error {
	h.requests[endpoint][answerPassed].Inc()
	r.Body = io.NopCloser(bytes.NewReader(bytes.Clone(body)))
	r.ContentLength = int64(len(body))
	return next.ServeHTTP(w, r)
}

// evaluate answers every flag of the request into sc.flags: at the edge,
// then from PostHog for those the edge cannot decide.
func (h *PostHogFlags) evaluate(r *http.Request, req *flagsapi.Request, sc *flagsScratch) int {
	sc.flags, sc.missing = sc.flags[:0], sc.missing[:0]
	if req.DisableFlags {
		return answerLocal
	}
	defs := h.app.engine.definitions()
	fs := h.allFlags(defs)
	if req.FlagKeys != nil {
		fs = defs.FlagSet(req.FlagKeys)
	}
	subject := eval.Subject{DistinctID: req.DistinctID, DeviceID: req.DeviceID, Person: req.PersonProperties, Groups: req.Groups}
	h.app.engine.cache.Evaluate(fs, &subject, &sc.results)
	flags := fs.Flags()
	for i := 0; i < fs.Len(); i++ {
		res := sc.results.At(i)
		sc.flags = append(sc.flags, flagsapi.FromResult(flags[i], res))
		if res.Inconclusive() {
			sc.missing = append(sc.missing, i)
		}
	}
	h.answers[sourceLocal].Add(float64(len(sc.flags) - len(sc.missing)))
	if len(sc.missing) == 0 {
		return answerLocal
	}
	if h.client == nil {
		h.answers[sourceServedFalse].Add(float64(len(sc.missing)))
		return answerInconclusive
	}
	filled, err := h.fill(r, req, sc)
	h.answers[sourcePostHogFill].Add(float64(filled))
	h.answers[sourceServedFalse].Add(float64(len(sc.missing) - filled))
	if err != nil {
		h.logger.Warn("PostHog did not fill in the flags the edge cannot decide; served false", zap.Int("flags", len(sc.missing)), zap.Error(err))
		return answerFillFailed
	}
	return answerFilled
}

// fill asks PostHog, in one call, for the flags at sc.missing, and puts its
// answers in their place. It returns how many it filled.
func (h *PostHogFlags) fill(r *http.Request, req *flagsapi.Request, sc *flagsScratch) (int, error) {
	keys := make([]string, len(sc.missing))
	for i, m := range sc.missing {
		keys[i] = sc.flags[m].Key
	}
	body, err := flagsapi.WithFlagKeys(req.JSON, keys)
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(r.Context(), time.Duration(h.FillTimeout))
	defer cancel()
	answer, err := h.client.Flags(ctx, body, clientIP(r))
	if err != nil {
		return 0, err
	}
	parsed, err := flagsapi.ParseResponse(answer)
	if err != nil {
		return 0, err
	}
	filled := 0
	for _, m := range sc.missing {
		f, ok := parsed.Flags[sc.flags[m].Key]
		if !ok {
			continue // PostHog does not know it either: false, as the proxy serves it
		}
		if f.ID == 0 {
			f.ID, f.Version = sc.flags[m].ID, sc.flags[m].Version
		}
		sc.flags[m] = f
		filled++
	}
	return filled, nil
}

// clientIP is the address of the visitor, as Caddy determined it (trusted
// proxies honoured).
func clientIP(r *http.Request) string {
	if ip, ok := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string); ok && ip != "" {
		return ip
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return ""
	}
	return host
}

// allFlags is the flag set of every flag, for the definitions in force.
func (h *PostHogFlags) allFlags(defs *eval.Definitions) *eval.FlagSet {
	if fs := h.all.Load(); fs != nil && fs.Definitions() == defs {
		return fs
	}
	fs := defs.FlagSet(nil)
	h.all.Store(fs)
	return fs
}

// Interface guards.
var (
	_ caddy.Provisioner           = (*PostHogFlags)(nil)
	_ caddyhttp.MiddlewareHandler = (*PostHogFlags)(nil)
	_ caddyfile.Unmarshaler       = (*PostHogFlags)(nil)
)

// bootstrap is {feature_flags.bootstrap}: the object posthog-js's bootstrap
// option takes, with this request's identity and the values of the handler's
// flags (an undecided flag is false, as the request is routed). It is safe to
// embed in an HTML <script> element.
func (st *requestState) bootstrap() string {
	b := flagsapi.Bootstrap{DistinctID: st.identity.DistinctID, IsIdentifiedID: identified(st.identity)}
	flags := st.bound.fs.Flags()
	b.Flags = make([]flagsapi.Flag, st.results.Len())
	for i := range b.Flags {
		b.Flags[i] = flagsapi.FromResult(flags[i], st.results.At(i))
	}
	return string(b.AppendHTMLSafe(nil))
}

// identified reports whether an identity is an identified user's rather than
// an anonymous visitor's: posthog-js's own cookie says so by a distinct id
// that differs from the device id; an id the proxy minted is anonymous; an id
// the site hands over (a header, its own cookie, a placeholder) is its user's.
func identified(id proxy.Identity) bool {
	switch id.Source {
	case proxy.SourceAssigned, proxy.SourceNone:
		return false
	case proxy.SourcePostHogCookie:
		return id.DeviceID != "" && id.DeviceID != id.DistinctID
	}
	return true
}

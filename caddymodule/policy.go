package caddymodule

import (
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/flagsplit/flagsplit/proxy"
)

func init() {
	caddy.RegisterModule(SelectionPolicy{})
}

// SelectionPolicy routes each request to the upstream its flag value maps to:
// gradual rollouts (true goes to the new side), experiments (one upstream per
// variant) and kill switches (a killed flag is false). Everything else (values
// without a route, flags that could not be decided, unknown flags) goes to the
// default upstream, and so does a request whose upstream is unavailable.
type SelectionPolicy struct {
	// Flag is the flag key.
	Flag string `json:"flag"`
	// Routes maps a flag value ("true", "false" or a variant) to an upstream
	// dial address as written in reverse_proxy.
	Routes map[string]string `json:"routes,omitempty"`
	// Default is the upstream for everything else.
	Default string `json:"default"`

	app    *App
	router *proxy.Router
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (SelectionPolicy) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.selection_policies.feature_flag",
		New: func() caddy.Module { return new(SelectionPolicy) },
	}
}

// UnmarshalCaddyfile sets up the policy from Caddyfile tokens. Syntax:
//
//	lb_policy feature_flag <flag> {
//		<value> <upstream>
//		default <upstream>
//	}
func (p *SelectionPolicy) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // policy name
	if !d.NextArg() {
		return d.ArgErr()
	}
	p.Flag = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		value := d.Val()
		if !d.NextArg() {
			return d.Errf("%s: an upstream is required", value)
		}
		upstream := d.Val()
		if d.NextArg() {
			return d.ArgErr()
		}
		if value == "default" {
			if p.Default != "" {
				return d.Err("default given twice")
			}
			p.Default = upstream
			continue
		}
		if p.Routes == nil {
			p.Routes = map[string]string{}
		}
		if _, dup := p.Routes[value]; dup {
			return d.Errf("value %q routed twice", value)
		}
		p.Routes[value] = upstream
	}
	if p.Default == "" {
		return d.Err("lb_policy feature_flag: a default upstream is required")
	}
	return nil
}

// Provision sets up the policy.
func (p *SelectionPolicy) Provision(ctx caddy.Context) error {
	if p.Flag == "" {
		return fmt.Errorf("feature_flag policy: flag is required")
	}
	router, err := proxy.NewRouter(p.Routes, p.Default)
	if err != nil {
		return fmt.Errorf("feature_flag policy for %q: %w", p.Flag, err)
	}
	p.router = router
	app, err := ctx.App("feature_flags")
	if err != nil {
		return fmt.Errorf("feature_flags app: %w", err)
	}
	p.app = app.(*App)
	p.logger = ctx.Logger()
	if err := p.checkUpstreams(ctx); err != nil {
		return err
	}
	values := slices.Sorted(maps.Keys(p.Routes))
	p.app.reference(flagReference{flag: p.Flag, values: values, where: "lb_policy feature_flag " + p.Flag})
	return nil
}

// checkUpstreams refuses routes to upstreams that are not in the
// reverse_proxy's upstream list: the policy can only choose from that list,
// so a default outside it answers every request 503, and a value routed
// outside it always goes to the default. With dynamic upstreams (or
// placeholders in the list) the list is known only per request, so a
// mismatch is a warning.
func (p *SelectionPolicy) checkUpstreams(ctx caddy.Context) error {
	mods := ctx.Modules()
	if len(mods) < 2 {
		return nil
	}
	h, ok := mods[len(mods)-2].(*reverseproxy.Handler)
	if !ok {
		return nil
	}
	var dials []string
	for _, u := range h.Upstreams {
		dials = append(dials, u.Dial)
	}
	problems, dynamic := upstreamProblems(p.router, p.Routes, dials, h.DynamicUpstreamsRaw != nil)
	if len(problems) == 0 {
		return nil
	}
	msg := fmt.Sprintf("lb_policy feature_flag %s: %s", p.Flag, strings.Join(problems, "; "))
	if dynamic {
		p.logger.Warn("the selection policy routes to upstreams the static upstream list lacks; with dynamic upstreams (or placeholders) they must come from there",
			zap.String("flag", p.Flag), zap.String("problem", msg))
		return nil
	}
	return errors.New(msg)
}

// upstreamPool adapts reverse_proxy's pool to proxy.Pool.
type upstreamPool reverseproxy.UpstreamPool

func (u upstreamPool) Len() int             { return len(u) }
func (u upstreamPool) Dial(i int) string    { return u[i].Dial }
func (u upstreamPool) Available(i int) bool { return u[i].Available() }

// Select implements reverseproxy.Selector.
func (p *SelectionPolicy) Select(pool reverseproxy.UpstreamPool, r *http.Request, _ http.ResponseWriter) *reverseproxy.Upstream {
	value, decided := "false", false
	st := p.app.requestFlags(r)
	if st != nil {
		value, decided = st.route(p.Flag)
	}
	i, decision := proxy.Select(p.router, upstreamPool(pool), value, decided)
	if st != nil {
		st.selected(p.Flag, decision)
	}
	if decision != proxy.DecisionRoute && decision != proxy.DecisionDefault {
		if c := p.logger.Check(zapcore.DebugLevel, "feature flag route unavailable"); c != nil {
			c.Write(zap.String("flag", p.Flag), zap.String("value", value), zap.String("decision", decision.String()))
		}
	}
	if i < 0 {
		return nil
	}
	return pool[i]
}

// upstreamProblems compares a policy's routes with the reverse_proxy's static
// upstream dials. dynamic is returned true when the list cannot be known
// before a request (a dynamic upstream source, or placeholders in a dial).
func upstreamProblems(router *proxy.Router, routes map[string]string, dials []string, dynamicSource bool) (problems []string, dynamic bool) {
	dynamic = dynamicSource
	var pool []string
	for _, d := range dials {
		if strings.Contains(d, "{") {
			dynamic = true
		}
		pool = append(pool, proxy.NormalizeUpstream(d))
	}
	listed := "the reverse_proxy has no static upstreams"
	if len(pool) > 0 {
		listed = "its upstreams are " + strings.Join(pool, ", ")
	}
	if !slices.Contains(pool, router.Default()) {
		problems = append(problems, fmt.Sprintf("default upstream %s is not one of this reverse_proxy's upstreams (%s): every request would get 503",
			router.Default(), listed))
	}
	for _, value := range slices.Sorted(maps.Keys(routes)) {
		if up := router.Route(value); !slices.Contains(pool, up) {
			problems = append(problems, fmt.Sprintf("value %q routes to %s, which is not one of this reverse_proxy's upstreams (%s): those requests would always go to the default",
				value, up, listed))
		}
	}
	return problems, dynamic
}

// Interface guards.
var (
	_ caddy.Provisioner     = (*SelectionPolicy)(nil)
	_ reverseproxy.Selector = (*SelectionPolicy)(nil)
	_ caddyfile.Unmarshaler = (*SelectionPolicy)(nil)
)

package caddymodule

import (
	"fmt"
	"net/http"

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
	return nil
}

// upstreamPool adapts reverse_proxy's pool to proxy.Pool.
type upstreamPool reverseproxy.UpstreamPool

func (u upstreamPool) Len() int             { return len(u) }
func (u upstreamPool) Dial(i int) string    { return u[i].Dial }
func (u upstreamPool) Available(i int) bool { return u[i].Available() }

// Select implements reverseproxy.Selector.
func (p *SelectionPolicy) Select(pool reverseproxy.UpstreamPool, r *http.Request, _ http.ResponseWriter) *reverseproxy.Upstream {
	value, decided := "false", false
	if st := p.app.requestFlags(r); st != nil {
		value, decided = st.route(p.Flag)
	}
	i, decision := proxy.Select(p.router, upstreamPool(pool), value, decided)
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

// Interface guards.
var (
	_ caddy.Provisioner     = (*SelectionPolicy)(nil)
	_ reverseproxy.Selector = (*SelectionPolicy)(nil)
	_ caddyfile.Unmarshaler = (*SelectionPolicy)(nil)
)

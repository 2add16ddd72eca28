package caddymodule

import (
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
)

// unobserved is a flag that decides something on a route no feature_flags
// handler runs before.
type unobserved struct {
	server, flag, by string
}

// checkSites warns, once per config load, about each flag that a
// feature_flag matcher or selection policy decides on a route with no
// feature_flags handler before it. There the flag is evaluated on demand for
// the decision, but nothing sees the response: those requests count in no
// requests_total or variant statistics, and feed no rollout, whose steps
// then never fill and whose guardrails never see the new side. Expression
// matchers using feature_flag(...) are not inspected.
func (a *App) checkSites() {
	found := a.unobservedFlags()
	for _, u := range found {
		msg := "this site routes by a flag without the feature_flags directive: its responses are not observed, " +
			"so they count in no request statistics and feed no rollout; add feature_flags to the site"
		fields := []zap.Field{zap.String("server", u.server), zap.String("flag", u.flag), zap.String("by", u.by)}
		if a.rollouts.Run(u.flag) != nil {
			msg = "a rollout's flag is routed on a site without the feature_flags directive: its responses are " +
				"not observed, so the rollout's steps never fill and its guardrails never see the new side there; " +
				"add feature_flags to the site"
		}
		a.logger.Warn(msg, fields...)
	}
}

// unobservedFlags walks the HTTP servers' routes.
func (a *App) unobservedFlags() []unobserved {
	v, err := a.ctx.AppIfConfigured("http")
	if err != nil {
		return nil
	}
	httpApp, ok := v.(*caddyhttp.App)
	if !ok {
		return nil
	}
	var found []unobserved
	report := func(server, flag, by string) {
		u := unobserved{server: server, flag: flag, by: by}
		if !slices.Contains(found, u) {
			found = append(found, u)
		}
	}
	for name, srv := range httpApp.Servers {
		label := name
		if len(srv.Listen) > 0 {
			label += " (" + strings.Join(srv.Listen, ", ") + ")"
		}
		walkRoutes(label, srv.Routes, false, report)
	}
	slices.SortFunc(found, func(x, y unobserved) int {
		return strings.Compare(x.server+"\x00"+x.flag+"\x00"+x.by, y.server+"\x00"+y.flag+"\x00"+y.by)
	})
	return found
}

// walkRoutes reports the flags decided in routes without a feature_flags
// handler before them. covered says one ran earlier in the chain. A handler
// covers the routes after its own only when its route matches every request
// (as the Caddyfile's directive does); routes are middleware, so it also
// covers what its route nests.
func walkRoutes(server string, routes caddyhttp.RouteList, covered bool, report func(server, flag, by string)) {
	for _, route := range routes {
		if !covered {
			for _, set := range route.MatcherSets {
				for _, m := range set {
					if ff, ok := m.(*MatchFeatureFlag); ok {
						report(server, ff.Flag, "feature_flag matcher")
					}
				}
			}
		}
		inRoute := covered
		for _, h := range route.Handlers {
			switch h := h.(type) {
			case *Handler:
				inRoute = true
			case *caddyhttp.Subroute:
				walkRoutes(server, h.Routes, inRoute, report)
			case *reverseproxy.Handler:
				if inRoute || h.LoadBalancing == nil {
					continue
				}
				if p, ok := h.LoadBalancing.SelectionPolicy.(*SelectionPolicy); ok {
					report(server, p.Flag, "lb_policy feature_flag")
				}
			}
		}
		if inRoute && len(route.MatcherSets) == 0 {
			covered = true
		}
	}
}

package caddymodule

import (
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/flagsplit/flagsplit/proxy"
	"github.com/flagsplit/flagsplit/rollout"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("feature_flags", parseGlobalOption)
	httpcaddyfile.RegisterHandlerDirective("feature_flags", parseHandlerDirective)
	// Before header: after map and vars (whose values can feed properties),
	// before rewrites, handle/route blocks, and reverse_proxy, so matchers and
	// the selection policy see the results.
	httpcaddyfile.RegisterDirectiveOrder("feature_flags", httpcaddyfile.Before, "header")
	// Before respond, and so before reverse_proxy: in the block that proxies
	// PostHog for posthog-js it answers the flags requests, and the proxy
	// takes everything else.
	httpcaddyfile.RegisterHandlerDirective("posthog_flags", parsePostHogFlags)
	httpcaddyfile.RegisterDirectiveOrder("posthog_flags", httpcaddyfile.Before, "respond")
}

// parseGlobalOption sets up the app from the global options block. Syntax:
//
//	feature_flags {
//		definitions <file>
//		posthog {
//			host <url>
//			project_api_key <key>
//			personal_api_key <key>
//			poll_interval <duration>
//			timeout <duration>
//			events on|off|all {
//				dedup_window <duration>
//				queue_size <events>
//				batch_size <events>
//				flush_interval <duration>
//			}
//		}
//		cache_size <subjects>
//		cache_min_cost <duration>
//		watch_interval <duration>
//		sync_interval <duration>
//		stale_after <duration>
//		rollout <flag> {
//			steps <percentage>...
//			step_duration <duration>
//			min_requests <n>
//			guardrail error_rate <factor>x
//			guardrail latency p<quantile> +<margin> [<factor>x]
//			on_breach rollback|hold
//			alpha <probability>
//			dry_run [on|off]
//		}
//	}
func parseGlobalOption(d *caddyfile.Dispenser, existing any) (any, error) {
	app := new(App)
	if existing != nil {
		return nil, d.Err("feature_flags global option given twice")
	}
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "feature_flags", Value: caddyconfig.JSON(app, nil)}, nil
}

// UnmarshalCaddyfile sets up the app from Caddyfile tokens (see parseGlobalOption).
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // option name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "definitions":
			if !d.NextArg() {
				return d.ArgErr()
			}
			a.Definitions = d.Val()
			if d.NextArg() {
				return d.ArgErr()
			}
		case "cache_size":
			if !d.NextArg() {
				return d.ArgErr()
			}
			n, err := strconv.Atoi(d.Val())
			if err != nil || n < 0 {
				return d.Errf("cache_size: want a number of subjects, got %q", d.Val())
			}
			a.CacheSize = &n
			if d.NextArg() {
				return d.ArgErr()
			}
		case "cache_min_cost":
			if !d.NextArg() {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(d.Val())
			if err != nil || dur < 0 {
				return d.Errf("cache_min_cost: bad duration %q", d.Val())
			}
			cd := caddy.Duration(dur)
			a.CacheMinCost = &cd
			if d.NextArg() {
				return d.ArgErr()
			}
		case "watch_interval":
			if err := parseDuration(d, &a.WatchInterval); err != nil {
				return err
			}
		case "sync_interval":
			if err := parseDuration(d, &a.SyncInterval); err != nil {
				return err
			}
		case "stale_after":
			if err := parseDuration(d, &a.StaleAfter); err != nil {
				return err
			}
		case "posthog":
			if a.PostHog != nil {
				return d.Err("posthog block given twice")
			}
			a.PostHog = new(PostHogConfig)
			if d.NextArg() {
				return d.ArgErr()
			}
			for nesting := d.Nesting(); d.NextBlock(nesting); {
				opt := d.Val()
				switch opt {
				case "host", "project_api_key", "personal_api_key":
					if !d.NextArg() {
						return d.ArgErr()
					}
					switch opt {
					case "host":
						a.PostHog.Host = d.Val()
					case "project_api_key":
						a.PostHog.ProjectAPIKey = d.Val()
					default:
						a.PostHog.PersonalAPIKey = d.Val()
					}
					if d.NextArg() {
						return d.ArgErr()
					}
				case "poll_interval":
					if err := parseDuration(d, &a.PostHog.PollInterval); err != nil {
						return err
					}
				case "timeout":
					if err := parseDuration(d, &a.PostHog.Timeout); err != nil {
						return err
					}
				case "events":
					ev, err := parseEvents(d)
					if err != nil {
						return err
					}
					a.PostHog.Events = ev
				default:
					return d.Errf("unrecognized posthog option %q", opt)
				}
			}
		case "rollout":
			rc, err := parseRollout(d)
			if err != nil {
				return err
			}
			for _, other := range a.Rollouts {
				if other.Flag == rc.Flag {
					return d.Errf("rollout %s given twice", rc.Flag)
				}
			}
			a.Rollouts = append(a.Rollouts, rc)
		default:
			return d.Errf("unrecognized feature_flags option %q", d.Val())
		}
	}
	return nil
}

// parseEvents reads `events on|off|all [{ dedup_window <d>; queue_size <n>;
// batch_size <n>; flush_interval <d> }]`.
func parseEvents(d *caddyfile.Dispenser) (*EventsConfig, error) {
	ev := new(EventsConfig)
	if !d.NextArg() {
		return nil, d.ArgErr()
	}
	switch ev.Mode = d.Val(); ev.Mode {
	case EventsOn, EventsOff, EventsAll:
	default:
		return nil, d.Errf("events: want on, off or all, got %q", ev.Mode)
	}
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch opt := d.Val(); opt {
		case "dedup_window":
			if err := parseDuration(d, &ev.DedupWindow); err != nil {
				return nil, err
			}
		case "flush_interval":
			if err := parseDuration(d, &ev.FlushInterval); err != nil {
				return nil, err
			}
		case "queue_size", "batch_size":
			if !d.NextArg() {
				return nil, d.ArgErr()
			}
			n, err := strconv.Atoi(d.Val())
			if err != nil || n <= 0 {
				return nil, d.Errf("events %s: want a positive number, got %q", opt, d.Val())
			}
			if opt == "queue_size" {
				ev.QueueSize = n
			} else {
				ev.BatchSize = n
			}
			if d.NextArg() {
				return nil, d.ArgErr()
			}
		default:
			return nil, d.Errf("unrecognized events option %q", opt)
		}
	}
	return ev, nil
}

// parseDuration reads one positive duration argument.
func parseDuration(d *caddyfile.Dispenser, dst *caddy.Duration) error {
	name := d.Val()
	if !d.NextArg() {
		return d.ArgErr()
	}
	dur, err := caddy.ParseDuration(d.Val())
	if err != nil || dur <= 0 {
		return d.Errf("%s: bad duration %q", name, d.Val())
	}
	*dst = caddy.Duration(dur)
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

func parseHandlerDirective(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	feature_flags {
//		distinct_id header <name>
//		distinct_id cookie posthog|<name>
//		distinct_id placeholder <placeholder>
//		assign_cookie [on|off] {
//			domain <domain>
//			max_age <duration>
//		}
//		person_property <name> <value>
//		group <type> <key>
//		group_property <type> <name> <value>
//		flags <flag>...
//	}
//
// distinct_id lines are tried in order. Without them: the X-POSTHOG-DISTINCT-ID
// header, then the posthog-js cookie. assign_cookie is on by default.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "distinct_id":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.Err("distinct_id: want header <name>, cookie posthog|<name> or placeholder <placeholder>")
			}
			src := IdentitySource{Source: args[0], Name: args[1]}
			if _, err := src.toSource(); err != nil {
				return d.Err(err.Error())
			}
			h.DistinctID = append(h.DistinctID, src)
		case "assign_cookie":
			on := true
			if d.NextArg() {
				switch d.Val() {
				case "on":
				case "off":
					on = false
				default:
					return d.Errf("assign_cookie: want on or off, got %q", d.Val())
				}
				if d.NextArg() {
					return d.ArgErr()
				}
			}
			h.AssignCookie = &on
			for nesting := d.Nesting(); d.NextBlock(nesting); {
				switch d.Val() {
				case "domain":
					if !d.NextArg() {
						return d.ArgErr()
					}
					h.CookieDomain = d.Val()
				case "max_age":
					if !d.NextArg() {
						return d.ArgErr()
					}
					dur, err := caddy.ParseDuration(d.Val())
					if err != nil || dur <= 0 {
						return d.Errf("max_age: bad duration %q", d.Val())
					}
					h.CookieMaxAge = caddy.Duration(dur)
				default:
					return d.Errf("unrecognized assign_cookie option %q", d.Val())
				}
				if d.NextArg() {
					return d.ArgErr()
				}
			}
		case "person_property":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.Err("person_property: want <name> <value>")
			}
			if h.PersonProperties == nil {
				h.PersonProperties = map[string]string{}
			}
			if _, dup := h.PersonProperties[args[0]]; dup {
				return d.Errf("person_property %q given twice", args[0])
			}
			h.PersonProperties[args[0]] = args[1]
		case "group":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.Err("group: want <type> <key>")
			}
			if h.Groups == nil {
				h.Groups = map[string]string{}
			}
			if _, dup := h.Groups[args[0]]; dup {
				return d.Errf("group %q given twice", args[0])
			}
			h.Groups[args[0]] = args[1]
		case "group_property":
			args := d.RemainingArgs()
			if len(args) != 3 {
				return d.Err("group_property: want <type> <name> <value>")
			}
			if h.GroupProperties == nil {
				h.GroupProperties = map[string]map[string]string{}
			}
			if h.GroupProperties[args[0]] == nil {
				h.GroupProperties[args[0]] = map[string]string{}
			}
			h.GroupProperties[args[0]][args[1]] = args[2]
		case "flags":
			keys := d.RemainingArgs()
			if len(keys) == 0 {
				return d.ArgErr()
			}
			h.Flags = append(h.Flags, keys...)
		case "headers":
			if !d.NextArg() {
				return d.ArgErr()
			}
			if _, err := proxy.ParseHeaderMode(d.Val()); err != nil {
				return d.Errf("headers: %v", err)
			}
			h.Headers = d.Val()
			if d.NextArg() {
				return d.ArgErr()
			}
		default:
			return d.Errf("unrecognized feature_flags subdirective %q", d.Val())
		}
	}
	return nil
}

// Interface guards.
var (
	_ caddyfile.Unmarshaler = (*App)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)

// parseRollout reads `rollout <flag> { ... }` (see parseGlobalOption).
func parseRollout(d *caddyfile.Dispenser) (*RolloutConfig, error) {
	rc := new(RolloutConfig)
	if !d.NextArg() {
		return nil, d.Err("rollout: want the flag's key")
	}
	rc.Flag = d.Val()
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch opt := d.Val(); opt {
		case "steps":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return nil, d.ArgErr()
			}
			for _, arg := range args {
				p, err := strconv.ParseFloat(strings.TrimSuffix(arg, "%"), 64)
				if err != nil || !(p > 0 && p <= 100) {
					return nil, d.Errf("rollout %s: step %q is not a percentage in (0, 100]", rc.Flag, arg)
				}
				rc.Steps = append(rc.Steps, p)
			}
		case "step_duration":
			if err := parseDuration(d, &rc.StepDuration); err != nil {
				return nil, err
			}
		case "min_requests":
			if !d.NextArg() {
				return nil, d.ArgErr()
			}
			n, err := strconv.ParseUint(d.Val(), 10, 64)
			if err != nil {
				return nil, d.Errf("rollout %s: min_requests: want a number of requests, got %q", rc.Flag, d.Val())
			}
			rc.MinRequests = &n
			if d.NextArg() {
				return nil, d.ArgErr()
			}
		case "guardrail":
			g, err := parseGuardrail(d, rc.Flag)
			if err != nil {
				return nil, err
			}
			rc.Guardrails = append(rc.Guardrails, g)
		case "on_breach":
			if !d.NextArg() {
				return nil, d.ArgErr()
			}
			rc.OnBreach = d.Val()
			if rc.OnBreach != "rollback" && rc.OnBreach != "hold" {
				return nil, d.Errf("rollout %s: on_breach: want rollback or hold, got %q", rc.Flag, rc.OnBreach)
			}
			if d.NextArg() {
				return nil, d.ArgErr()
			}
		case "alpha":
			if !d.NextArg() {
				return nil, d.ArgErr()
			}
			a, err := strconv.ParseFloat(d.Val(), 64)
			if err != nil || !(a > 0 && a < 1) {
				return nil, d.Errf("rollout %s: alpha: want a probability in (0, 1), got %q", rc.Flag, d.Val())
			}
			rc.Alpha = a
			if d.NextArg() {
				return nil, d.ArgErr()
			}
		case "dry_run":
			rc.DryRun = true
			if d.NextArg() {
				switch d.Val() {
				case "on":
				case "off":
					rc.DryRun = false
				default:
					return nil, d.Errf("rollout %s: dry_run: want on or off, got %q", rc.Flag, d.Val())
				}
			}
			if d.NextArg() {
				return nil, d.ArgErr()
			}
		default:
			return nil, d.Errf("rollout %s: unrecognized option %q", rc.Flag, opt)
		}
	}
	if len(rc.Steps) == 0 {
		return nil, d.Errf("rollout %s: steps are required", rc.Flag)
	}
	if _, err := rc.rampConfig(); err != nil {
		return nil, d.Err(err.Error())
	}
	return rc, nil
}

// parseGuardrail reads `guardrail error_rate <factor>x` or
// `guardrail latency p<quantile> +<margin> [<factor>x]`.
func parseGuardrail(d *caddyfile.Dispenser, flag string) (GuardrailConfig, error) {
	var g GuardrailConfig
	args := d.RemainingArgs()
	if len(args) == 0 {
		return g, d.ArgErr()
	}
	g.Metric = args[0]
	switch g.Metric {
	case "error_rate":
		if len(args) != 2 {
			return g, d.Errf("rollout %s: want `guardrail error_rate <factor>x`, e.g. 2x", flag)
		}
		f, err := parseFactor(args[1])
		if err != nil {
			return g, d.Errf("rollout %s: guardrail error_rate: %v", flag, err)
		}
		g.Factor = f
	case "latency":
		if len(args) != 3 && len(args) != 4 {
			return g, d.Errf("rollout %s: want `guardrail latency p<quantile> +<margin> [<factor>x]`, e.g. p99 +250ms", flag)
		}
		q, ok := strings.CutPrefix(args[1], "p")
		pct, err := strconv.ParseFloat(q, 64)
		if !ok || err != nil || !(pct > 0 && pct < 100) {
			return g, d.Errf("rollout %s: guardrail latency: quantile %q: want p50, p99, p99.9 ...", flag, args[1])
		}
		// Rounded so that p99.9 is 0.999, not 0.9990000000000001.
		g.Quantile = math.Round(pct*1e7) / 1e9
		margin, err := caddy.ParseDuration(strings.TrimPrefix(args[2], "+"))
		if err != nil || margin < 0 {
			return g, d.Errf("rollout %s: guardrail latency: margin %q: want a duration such as +250ms", flag, args[2])
		}
		g.Margin = caddy.Duration(margin)
		if len(args) == 4 {
			f, err := parseFactor(args[3])
			if err != nil {
				return g, d.Errf("rollout %s: guardrail latency: %v", flag, err)
			}
			g.Factor = f
		}
	default:
		return g, d.Errf("rollout %s: unknown guardrail %q (error_rate or latency)", flag, g.Metric)
	}
	return g, nil
}

// parseFactor reads a ratio such as 2x or 1.5x (the x is optional).
func parseFactor(s string) (float64, error) {
	f, err := strconv.ParseFloat(strings.TrimSuffix(s, "x"), 64)
	if err != nil || !(f >= 1 && f <= rollout.MaxFactor) {
		return 0, fmt.Errorf("factor %q: want a ratio of at least 1, such as 2x", s)
	}
	return f, nil
}

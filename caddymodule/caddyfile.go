package caddymodule

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("feature_flags", parseGlobalOption)
	httpcaddyfile.RegisterHandlerDirective("feature_flags", parseHandlerDirective)
	// Before header: after map and vars (whose values can feed properties),
	// before rewrites, handle/route blocks, and reverse_proxy, so matchers and
	// the selection policy see the results.
	httpcaddyfile.RegisterDirectiveOrder("feature_flags", httpcaddyfile.Before, "header")
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

package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/posthog"
	"github.com/flagsplit/flagsplit/proxy"
)

// configReport is what `caddy feature-flags validate --config` found.
type configReport struct {
	// source describes where the definitions came from.
	source string
	defs   *eval.Definitions
	refs   []flagReference
	// handlers are the feature_flags handlers' header settings.
	handlers []handlerHeaders
	// errors make the config fail to load, or flags never match;
	// warnings are worth a look.
	errors, warnings []string
}

// checkConfig checks a whole Caddy config (JSON) against its definitions
// source: every flag and value that matchers, selection policies, flags lines
// and rollouts name, and every upstream a selection policy routes to. It uses
// the checks the modules make when they load (checkReference,
// upstreamProblems), on the config as written. dir resolves a relative
// definitions path, as Caddy does from its working directory. fetch gets
// PostHog's definitions for a config whose source is PostHog.
func checkConfig(cfgJSON []byte, dir string, fetch func(context.Context, *PostHogConfig) ([]byte, error)) (*configReport, error) {
	var cfg struct {
		Apps struct {
			FeatureFlags *App            `json:"feature_flags"`
			HTTP         json.RawMessage `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		return nil, fmt.Errorf("reading the config: %w", err)
	}
	app := cfg.Apps.FeatureFlags
	if app == nil {
		app = new(App)
	}
	rep := &configReport{}
	data, err := rep.loadDefinitions(app, dir, fetch)
	if err != nil {
		return nil, err
	}
	if rep.defs, _, err = sourceCLI.parse(data); err != nil {
		return nil, fmt.Errorf("%s: %w", rep.source, err)
	}
	for _, rc := range app.Rollouts {
		if rc != nil {
			rep.refs = append(rep.refs, flagReference{flag: rc.Flag, where: "rollout " + rc.Flag})
		}
	}
	if len(cfg.Apps.HTTP) > 0 {
		var httpApp struct {
			Servers map[string]struct {
				Routes []jsonRoute `json:"routes"`
			} `json:"servers"`
		}
		if err := json.Unmarshal(cfg.Apps.HTTP, &httpApp); err != nil {
			return nil, fmt.Errorf("reading the http app: %w", err)
		}
		for _, name := range slices.Sorted(maps.Keys(httpApp.Servers)) {
			rep.walk("server "+name, httpApp.Servers[name].Routes)
		}
	}
	for _, ref := range rep.refs {
		for _, p := range checkReference(rep.defs, ref) {
			rep.errors = append(rep.errors, p.msg)
		}
	}
	for _, hh := range rep.handlers {
		rep.checkHeaders(hh)
	}
	return rep, nil
}

// handlerHeaders is what decides the headers a feature_flags handler sends.
type handlerHeaders struct {
	where string
	flags []string
	mode  string
}

// checkHeaders reports what the handler warns about at load: flags whose
// per-flag headers collide, and more per-flag headers than
// proxy.ManyFlagHeaders without a flags line.
func (rep *configReport) checkHeaders(hh handlerHeaders) {
	mode, err := proxy.ParseHeaderMode(hh.mode)
	if err != nil {
		rep.errors = append(rep.errors, fmt.Sprintf("feature_flags (%s): %v", hh.where, err))
		return
	}
	hw, collisions := proxy.NewHeaderWriter(mode, rep.defs.FlagSet(hh.flags).Keys())
	for _, c := range collisions {
		rep.warnings = append(rep.warnings, fmt.Sprintf("feature_flags (%s): %s", hh.where, c))
	}
	if n := hw.FlagHeaders(); n > proxy.ManyFlagHeaders && len(hh.flags) == 0 {
		rep.warnings = append(rep.warnings, fmt.Sprintf("feature_flags (%s): %s", hh.where, manyHeadersMessage(n)))
	}
}

// loadDefinitions reads the config's definitions: its file when it has one
// and no posthog block (or PostHog cannot be asked), otherwise PostHog's
// answer.
func (rep *configReport) loadDefinitions(app *App, dir string, fetch func(context.Context, *PostHogConfig) ([]byte, error)) ([]byte, error) {
	file := app.Definitions
	if file != "" && !filepath.IsAbs(file) {
		file = filepath.Join(dir, file)
	}
	if app.PostHog != nil && fetch != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		data, err := fetch(ctx, app.PostHog)
		if err == nil {
			rep.source = "PostHog at " + app.PostHog.Host
			return data, nil
		}
		if file == "" {
			return nil, fmt.Errorf("fetching the definitions from PostHog: %w", err)
		}
		rep.warnings = append(rep.warnings, fmt.Sprintf("fetching the definitions from PostHog failed (%v); checked against the fallback file", err))
	}
	if file == "" {
		return nil, errors.New("the config has no definitions source: no definitions file and no posthog block in the feature_flags global option")
	}
	data, err := readDefinitionsFile(file)
	if err != nil {
		return nil, err
	}
	rep.source = "definitions " + app.Definitions
	return data, nil
}

// jsonRoute is the part of a route the check reads.
type jsonRoute struct {
	Match  []map[string]json.RawMessage `json:"match"`
	Handle []json.RawMessage            `json:"handle"`
}

// celFeatureFlag finds feature_flag('key', 'value', ...) calls in CEL
// expressions.
var celFeatureFlag = regexp.MustCompile(`feature_flag\(\s*((?:'[^']*'|"[^"]*")(?:\s*,\s*(?:'[^']*'|"[^"]*"))*)\s*\)`)

var celString = regexp.MustCompile(`'([^']*)'|"([^"]*)"`)

// walk collects the references and checks the policies in routes.
func (rep *configReport) walk(where string, routes []jsonRoute) {
	for _, route := range routes {
		for _, set := range route.Match {
			if raw, ok := set["feature_flag"]; ok {
				var m MatchFeatureFlag
				if json.Unmarshal(raw, &m) == nil {
					rep.refs = append(rep.refs, flagReference{flag: m.Flag, values: m.Values, where: "feature_flag matcher (" + where + ")"})
				}
			}
			if raw, ok := set["expression"]; ok {
				rep.walkExpression(where, raw)
			}
		}
		for _, raw := range route.Handle {
			var h struct {
				Handler string   `json:"handler"`
				Flags   []string `json:"flags"`
				// Headers is a string for feature_flags, an object for
				// reverse_proxy.
				Headers json.RawMessage `json:"headers"`
				Routes  []jsonRoute     `json:"routes"`
				// reverse_proxy
				Upstreams []struct {
					Dial string `json:"dial"`
				} `json:"upstreams"`
				DynamicUpstreams json.RawMessage `json:"dynamic_upstreams"`
				LoadBalancing    *struct {
					SelectionPolicy json.RawMessage `json:"selection_policy"`
				} `json:"load_balancing"`
			}
			if json.Unmarshal(raw, &h) != nil {
				continue
			}
			switch h.Handler {
			case "feature_flags":
				hh := handlerHeaders{where: where, flags: h.Flags}
				if len(h.Headers) > 0 && json.Unmarshal(h.Headers, &hh.mode) != nil {
					hh.mode = string(h.Headers)
				}
				rep.handlers = append(rep.handlers, hh)
				for _, f := range h.Flags {
					rep.refs = append(rep.refs, flagReference{flag: f, where: "feature_flags flags (" + where + ")"})
				}
			case "subroute":
				rep.walk(where, h.Routes)
			case "reverse_proxy":
				if h.LoadBalancing == nil {
					continue
				}
				var p struct {
					Policy string `json:"policy"`
					SelectionPolicy
				}
				if json.Unmarshal(h.LoadBalancing.SelectionPolicy, &p) != nil || p.Policy != "feature_flag" {
					continue
				}
				rep.refs = append(rep.refs, flagReference{flag: p.Flag, values: slices.Sorted(maps.Keys(p.Routes)),
					where: "lb_policy feature_flag " + p.Flag + " (" + where + ")"})
				router, err := proxy.NewRouter(p.Routes, p.Default)
				if err != nil {
					rep.errors = append(rep.errors, fmt.Sprintf("lb_policy feature_flag %s (%s): %v", p.Flag, where, err))
					continue
				}
				var dials []string
				for _, u := range h.Upstreams {
					dials = append(dials, u.Dial)
				}
				problems, dynamic := upstreamProblems(router, p.Routes, dials, len(h.DynamicUpstreams) > 0)
				for _, pr := range problems {
					msg := fmt.Sprintf("lb_policy feature_flag %s (%s): %s", p.Flag, where, pr)
					if dynamic {
						rep.warnings = append(rep.warnings, msg+" (dynamic upstreams: check that they provide it)")
					} else {
						rep.errors = append(rep.errors, msg)
					}
				}
			}
		}
	}
}

func (rep *configReport) walkExpression(where string, raw json.RawMessage) {
	var expr string
	if json.Unmarshal(raw, &expr) != nil {
		var obj struct {
			Expr string `json:"expr"`
		}
		if json.Unmarshal(raw, &obj) != nil {
			return
		}
		expr = obj.Expr
	}
	for _, call := range celFeatureFlag.FindAllStringSubmatch(expr, -1) {
		var args []string
		for _, m := range celString.FindAllStringSubmatch(call[1], -1) {
			args = append(args, m[1]+m[2])
		}
		if len(args) > 0 {
			rep.refs = append(rep.refs, flagReference{flag: args[0], values: args[1:], where: "feature_flag expression (" + where + ")"})
		}
	}
}

// fetchFromPostHog asks PostHog for the definitions a posthog block names,
// with its placeholders ({env.*}) expanded.
func fetchFromPostHog(ctx context.Context, cfg *PostHogConfig) ([]byte, error) {
	repl := caddy.NewReplacer()
	c := &posthog.Client{Host: repl.ReplaceAll(cfg.Host, ""), ProjectAPIKey: repl.ReplaceAll(cfg.ProjectAPIKey, ""),
		PersonalAPIKey: repl.ReplaceAll(cfg.PersonalAPIKey, ""), Timeout: 20 * time.Second, UserAgent: userAgent()}
	if c.Host == "" {
		c.Host = posthog.DefaultHost
	}
	if c.ProjectAPIKey == "" || c.PersonalAPIKey == "" {
		return nil, errors.New("the posthog block needs project_api_key and personal_api_key")
	}
	resp, err := c.FetchDefinitions(ctx, "")
	if err != nil {
		return nil, err
	}
	if resp.Outcome != posthog.Modified {
		return nil, fmt.Errorf("PostHog answered %s (%s)", resp.Outcome, resp.Detail)
	}
	return resp.Body, nil
}

// String formats the report.
func (rep *configReport) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %d flags\n", rep.source, rep.defs.Len())
	flags := map[string]bool{}
	for _, r := range rep.refs {
		flags[r.flag] = true
	}
	fmt.Fprintf(&b, "%d references to %d flags checked\n", len(rep.refs), len(flags))
	for _, w := range rep.warnings {
		fmt.Fprintf(&b, "  warning: %s\n", w)
	}
	for _, e := range rep.errors {
		fmt.Fprintf(&b, "  error: %s\n", e)
	}
	return b.String()
}

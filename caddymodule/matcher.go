package caddymodule

import (
	"fmt"
	"net/http"
	"reflect"
	"slices"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/types/ref"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(MatchFeatureFlag{})
}

// MatchFeatureFlag matches requests by a flag's value for the request: with no
// values, when the flag is enabled (true or any variant); otherwise when its
// value ("true", "false" or a variant key) is one of Values. A flag that cannot
// be decided is "false".
//
// It reads the results of the feature_flags handler when one ran earlier in the
// route, and evaluates on its own otherwise.
type MatchFeatureFlag struct {
	// Flag is the flag key.
	Flag string `json:"flag"`
	// Values are the values to match.
	Values []string `json:"values,omitempty"`

	app *App
}

// CaddyModule returns the Caddy module information.
func (MatchFeatureFlag) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.matchers.feature_flag",
		New: func() caddy.Module { return new(MatchFeatureFlag) },
	}
}

// UnmarshalCaddyfile sets up the matcher from Caddyfile tokens. Syntax:
//
//	feature_flag <flag> [<value>...]
func (m *MatchFeatureFlag) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // matcher name
	if !d.NextArg() {
		return d.ArgErr()
	}
	m.Flag = d.Val()
	m.Values = append(m.Values, d.RemainingArgs()...)
	if d.NextBlock(0) {
		return d.Err("feature_flag matcher takes no block")
	}
	return nil
}

// Provision looks up the feature_flags app.
func (m *MatchFeatureFlag) Provision(ctx caddy.Context) error {
	if m.Flag == "" {
		return fmt.Errorf("feature_flag matcher: flag key is required")
	}
	app, err := ctx.App("feature_flags")
	if err != nil {
		return fmt.Errorf("feature_flags app: %w", err)
	}
	m.app = app.(*App)
	m.app.reference(flagReference{flag: m.Flag, values: m.Values, where: "feature_flag matcher"})
	return nil
}

// MatchWithError implements caddyhttp.RequestMatcherWithError.
func (m MatchFeatureFlag) MatchWithError(r *http.Request) (bool, error) {
	st := m.app.requestFlags(r)
	if st == nil {
		return false, nil
	}
	value, _ := st.route(m.Flag)
	st.matched(m.Flag)
	if len(m.Values) == 0 {
		return value != "false", nil
	}
	return slices.Contains(m.Values, value), nil
}

// Match implements caddyhttp.RequestMatcher.
func (m MatchFeatureFlag) Match(r *http.Request) bool {
	ok, _ := m.MatchWithError(r)
	return ok
}

// CELLibrary makes the matcher available in expressions:
//
//	expression feature_flag('new-checkout-flow')
//	expression feature_flag('homepage-hero', 'variant-b', 'variant-c')
func (MatchFeatureFlag) CELLibrary(ctx caddy.Context) (cel.Library, error) {
	return caddyhttp.CELMatcherImpl(
		"feature_flag",
		"feature_flag_request_list",
		[]*cel.Type{cel.ListType(cel.StringType)},
		func(data ref.Val) (caddyhttp.RequestMatcherWithError, error) {
			native, err := data.ConvertToNative(reflect.TypeOf([]string{}))
			if err != nil {
				return nil, err
			}
			args := native.([]string)
			if len(args) == 0 {
				return nil, fmt.Errorf("feature_flag: a flag key is required")
			}
			m := MatchFeatureFlag{Flag: args[0], Values: args[1:]}
			if err := m.Provision(ctx); err != nil {
				return nil, err
			}
			return m, nil
		},
	)
}

// Interface guards.
var (
	_ caddy.Provisioner                 = (*MatchFeatureFlag)(nil)
	_ caddyhttp.RequestMatcherWithError = (*MatchFeatureFlag)(nil)
	_ caddyhttp.CELLibraryProducer      = (*MatchFeatureFlag)(nil)
	_ caddyfile.Unmarshaler             = (*MatchFeatureFlag)(nil)
)

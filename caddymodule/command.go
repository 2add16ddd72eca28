package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/proxy"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "feature-flags",
		Usage: "validate <definitions.json> | validate --config <Caddyfile> | eval --definitions <file> --distinct-id <id> [--flag <key>] ...",
		Short: "Checks flag definitions and evaluates flags locally",
		Long: `
Works on PostHog flag-definitions JSON (the body of /flags/definitions).

  validate  parses a file, lists every flag and warns about what cannot be
            evaluated locally; exits non-zero when the file is malformed.
            With --config, checks a Caddy config's flag references and
            routes against the definitions it loads.
  eval      prints, as JSON, what flagsplit answers for a subject.`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.AddCommand(validateCommand(), evalCommand())
		},
	})
}

func validateCommand() *cobra.Command {
	var config, adapter string
	cmd := &cobra.Command{
		Use:   "validate <definitions.json> | --config <Caddyfile|caddy.json>",
		Short: "Checks flag definitions, or a whole Caddy config against its definitions",
		Long: `With a definitions file: parses it, lists every flag and warns about what
cannot be evaluated locally.

With --config: adapts the config (a Caddyfile, or JSON) and checks every flag
and value that its feature_flag matchers, lb_policy feature_flag policies,
flags lines and rollouts name against the definitions the config loads (its
definitions file, or PostHog's answer for its posthog block), and every
upstream a policy routes to against the reverse_proxy's own list. Exits
non-zero when something does not match.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if (config == "") == (len(args) == 0) || len(args) > 1 {
				return errors.New("give a definitions file, or --config with a Caddy config")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SilenceUsage = true
			if config != "" {
				return validateConfig(cmd.OutOrStdout(), config, adapter, fetchFromPostHog)
			}
			return validateDefinitions(cmd.OutOrStdout(), args[0])
		},
	}
	cmd.Flags().StringVar(&config, "config", "", "a Caddy config to check against its definitions")
	cmd.Flags().StringVar(&adapter, "adapter", "", "the config's adapter (default: caddyfile, json for a .json file)")
	return cmd
}

// errConfigMismatch makes validate --config exit non-zero after its report.
var errConfigMismatch = errors.New("the config does not match its flag definitions")

// validateConfig checks a Caddy config against its definitions source.
func validateConfig(out io.Writer, path, adapter string, fetch func(context.Context, *PostHogConfig) ([]byte, error)) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if adapter == "" {
		adapter = "caddyfile"
		if strings.HasSuffix(path, ".json") {
			adapter = "json"
		}
	}
	if adapter != "json" {
		a := caddyconfig.GetAdapter(adapter)
		if a == nil {
			return fmt.Errorf("unknown config adapter %q", adapter)
		}
		if data, _, err = a.Adapt(data, map[string]any{"filename": path}); err != nil {
			return fmt.Errorf("adapting %s: %w", path, err)
		}
	}
	dir, err := os.Getwd()
	if err != nil {
		return err
	}
	rep, err := checkConfig(data, dir, fetch)
	if err != nil {
		fmt.Fprintf(out, "%s: %v\n", path, err)
		return errConfigMismatch
	}
	fmt.Fprintf(out, "%s: %s", path, rep)
	if len(rep.errors) > 0 {
		return errConfigMismatch
	}
	return nil
}

// errInvalidDefinitions makes validate exit non-zero after printing its report.
var errInvalidDefinitions = errors.New("flag definitions have errors")

func validateDefinitions(out io.Writer, path string) error {
	data, err := readDefinitionsFile(path)
	if err != nil {
		fmt.Fprintf(out, "%s: %v\n", path, err)
		return errInvalidDefinitions
	}
	if err := checkDocument(data); err != nil {
		fmt.Fprintf(out, "%s: %v\n", path, err)
		return errInvalidDefinitions
	}
	defs, err := eval.Parse(data)
	if err != nil {
		fmt.Fprintf(out, "%s: %v\n", path, err)
		return errInvalidDefinitions
	}
	fmt.Fprintf(out, "%s: %d flags\n\n", path, defs.Len())
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FLAG\tSTATE\tKIND\tCONDITIONS\tLOCAL")
	local := map[string]bool{}
	for _, w := range defs.Warnings() {
		if w.Flag != "" {
			local[w.Flag] = true
		}
	}
	for _, p := range defs.Problems() {
		if p.Flag != "" {
			local[p.Flag] = true
		}
	}
	for _, f := range defs.Flags() {
		state := "active"
		if !f.Active {
			state = "inactive"
		}
		kind := "boolean"
		if v := f.Variants(); len(v) > 0 {
			kind = "multivariate: " + strings.Join(v, ", ")
		}
		if g, ok := f.IsGroupFlag(); ok {
			if g == "" {
				g = "?"
			}
			kind += " (group: " + g + ")"
		}
		evaluable := "yes"
		switch {
		case f.NeverLocal() != "":
			evaluable = "never"
		case local[f.Key]:
			evaluable = "partly"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", f.Key, state, kind, f.ConditionCount(), evaluable)
	}
	tw.Flush()
	var never []string
	for _, f := range defs.Flags() {
		if why := f.NeverLocal(); why != "" {
			never = append(never, fmt.Sprintf("  %s: %s", f.Key, why))
		}
	}
	if len(never) > 0 {
		fmt.Fprintf(out, "\nNever evaluated locally (always false and the default route here):\n%s\n", strings.Join(never, "\n"))
	}
	var slow []string
	for _, f := range defs.Flags() {
		for _, pattern := range f.BacktrackingRegexes() {
			slow = append(slow, fmt.Sprintf("  %s: %q", f.Key, pattern))
		}
	}
	if len(slow) > 0 {
		fmt.Fprintf(out, "\nRegexes on the slower, backtracking engine (RE2 cannot run them; a match that takes over %s is inconclusive, regex_timeout):\n%s\n",
			eval.RegexMatchTimeout, strings.Join(slow, "\n"))
	}
	if hw, collisions := proxy.NewHeaderWriter(proxy.HeadersPerFlag, defs.FlagSet(nil).Keys()); len(collisions) > 0 || hw.FlagHeaders() > proxy.ManyFlagHeaders {
		fmt.Fprintf(out, "\nRequest headers (the default per_flag form, without a flags line):\n")
		for _, c := range collisions {
			fmt.Fprintf(out, "  warning: %s\n", c)
		}
		if n := hw.FlagHeaders(); n > proxy.ManyFlagHeaders {
			fmt.Fprintf(out, "  warning: %s\n", manyHeadersMessage(n))
		}
	}
	if w := defs.Warnings(); len(w) > 0 {
		fmt.Fprintf(out, "\nCannot always be evaluated locally (such requests get false and the default route):\n")
		for _, p := range w {
			fmt.Fprintf(out, "  warning: %s\n", p)
		}
	}
	if p := defs.Problems(); len(p) > 0 {
		fmt.Fprintf(out, "\nErrors:\n")
		for _, pr := range p {
			fmt.Fprintf(out, "  error: %s\n", pr)
		}
		return errInvalidDefinitions
	}
	return nil
}

// readDefinitions reads a definitions file for a command, parsed as flagsplit
// would parse it as its definitions file: a malformed flag refuses it.
func readDefinitions(path string) (*eval.Definitions, error) {
	data, err := readDefinitionsFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	defs, _, err := sourceCLI.parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return defs, nil
}

type evalOptions struct {
	definitions, distinctID, deviceID, now string
	flags                                  []string
	personProps, groups, groupProps        string
}

func evalCommand() *cobra.Command {
	var o evalOptions
	cmd := &cobra.Command{
		Use:   "eval --definitions <file> --distinct-id <id> [--flag <key>]...",
		Short: "Evaluates flags for a subject and prints the results as JSON",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cmd.SilenceUsage = true
			return runEval(cmd.OutOrStdout(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.definitions, "definitions", "", "flag-definitions JSON file (required)")
	f.StringVar(&o.distinctID, "distinct-id", "", "the person's distinct id (required)")
	f.StringVar(&o.deviceID, "device-id", "", "device id, for flags bucketed by device")
	f.StringSliceVar(&o.flags, "flag", nil, "flag key to evaluate (repeatable; default every flag)")
	f.StringVar(&o.personProps, "person-properties", "", `person properties as a JSON object, e.g. '{"plan":"pro"}'`)
	f.StringVar(&o.groups, "groups", "", `groups as a JSON object of type to key, e.g. '{"company":"acme"}'`)
	f.StringVar(&o.groupProps, "group-properties", "", `group properties as a JSON object of type to properties`)
	f.StringVar(&o.now, "now", "", "the clock for relative dates, RFC 3339 (default: now)")
	return cmd
}

func runEval(out io.Writer, o evalOptions) error {
	if o.definitions == "" || o.distinctID == "" {
		return errors.New("--definitions and --distinct-id are required")
	}
	defs, err := readDefinitions(o.definitions)
	if err != nil {
		return err
	}
	subj, err := subjectFromJSON(subjectJSON{
		distinctID: o.distinctID, deviceID: o.deviceID,
		person: o.personProps, groups: o.groups, groupProps: o.groupProps,
	}, "--")
	if err != nil {
		return err
	}
	if o.now != "" {
		if subj.Now, err = time.Parse(time.RFC3339, o.now); err != nil {
			return fmt.Errorf("--now: %w", err)
		}
	}
	results := evaluateFlags(defs, &subj, o.flags)
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(struct {
		DistinctID string        `json:"distinct_id"`
		Results    []eval.Result `json:"results"`
	}{o.distinctID, results})
}

// subjectJSON is a subject as the CLI and the admin API take it: ids, and
// properties and groups as JSON objects.
type subjectJSON struct {
	distinctID, deviceID       string
	person, groups, groupProps string
}

// subjectFromJSON builds a subject; prefix names the options in errors ("--" for
// command-line flags, "" for query parameters).
func subjectFromJSON(in subjectJSON, prefix string) (eval.Subject, error) {
	subj := eval.Subject{DistinctID: in.distinctID, DeviceID: in.deviceID}
	var err error
	if subj.Person, err = parseProperties(prefix+"person"+sep(prefix)+"properties", in.person); err != nil {
		return subj, err
	}
	var groups map[string]eval.Value
	if in.groups != "" {
		if err := json.Unmarshal([]byte(in.groups), &groups); err != nil {
			return subj, fmt.Errorf("%sgroups: %w", prefix, err)
		}
	}
	var groupProps map[string]map[string]eval.Value
	if in.groupProps != "" {
		if err := json.Unmarshal([]byte(in.groupProps), &groupProps); err != nil {
			return subj, fmt.Errorf("%sgroup%sproperties: %w", prefix, sep(prefix), err)
		}
	}
	types := make([]string, 0, len(groups))
	for t := range groups {
		types = append(types, t)
	}
	sort.Strings(types)
	for _, t := range types {
		subj.Groups = append(subj.Groups, eval.Group{Type: t, Key: groups[t].Text(), Properties: eval.PropertiesFromMap(groupProps[t])})
	}
	return subj, nil
}

// sep is the word separator of option names: "-" on the command line, "_" in
// query parameters.
func sep(prefix string) string {
	if prefix == "--" {
		return "-"
	}
	return "_"
}

// evaluateFlags answers the given flags, or every flag when keys is empty.
func evaluateFlags(defs *eval.Definitions, subj *eval.Subject, keys []string) []eval.Result {
	if len(keys) == 0 {
		return defs.EvaluateAll(subj, nil)
	}
	results := make([]eval.Result, 0, len(keys))
	for _, key := range keys {
		results = append(results, defs.Evaluate(key, subj))
	}
	return results
}

func parseProperties(flag, raw string) (eval.Properties, error) {
	if raw == "" {
		return nil, nil
	}
	var m map[string]eval.Value
	if err := json.Unmarshal([]byte(raw), &m); err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	return eval.PropertiesFromMap(m), nil
}

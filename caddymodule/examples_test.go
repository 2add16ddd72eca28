package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// The examples under examples/ are checked against the metrics the plugin
// really exports: every metric name a dashboard query or an alerting rule
// uses must be on /metrics after the traffic of exampleTraffic.

const (
	dashboardFile = "../examples/grafana/flagsplit.json"
	rulesFile     = "../examples/prometheus/flagsplit-rules.yml"
)

// exampleDefs has a rollout flag, a multivariate flag and a flag targeted by
// a person property that requests leave out (inconclusive).
var exampleDefs = []byte(`{"flags": [
	{"id": 7, "key": "checkout", "active": true, "filters": {"groups": [{"properties": [], "rollout_percentage": 100}]}},
	{"id": 8, "key": "hero", "active": true, "filters": {"groups": [{"properties": []}], "multivariate": {"variants": [
		{"key": "control", "rollout_percentage": 50}, {"key": "test", "rollout_percentage": 50}]}}},
	{"id": 9, "key": "targeted", "active": true, "filters": {"groups": [
		{"properties": [{"key": "plan", "type": "person", "value": ["pro"], "operator": "exact"}], "rollout_percentage": 100}]}}
], "group_type_mapping": {}, "cohorts": {}}`)

// exampleTraffic runs a config in the in-process Caddy and sends it traffic
// that makes every series of the plugin exist: requests routed by a
// rollout's flag on both sides until its failing new side is rolled back, a
// multivariate flag whose test upstream fails and is then fallen back from,
// and inconclusive evaluations.
func exampleTraffic(t *testing.T) {
	t.Helper()
	storage := t.TempDir()
	defsFile := filepath.Join(storage, "flags.json")
	writeFileAtomically(t, defsFile, exampleDefs)
	old, nu, bad := newUpstream(t, "old"), newSwitchableUpstream(t, "new"), newSwitchableUpstream(t, "bad")
	bad.failStatus.Store(http.StatusServiceUnavailable)
	cfg, events := withEventRecorder(t, fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
		sync_interval 100ms
		rollout checkout {
			steps 50 100
			step_duration 1h
			min_requests 10
			guardrail error_rate 2x
		}
	}
}
:9080 {
	feature_flags {
		person_property plan {header.X-Plan}
	}
	handle /hero {
		reverse_proxy %s %s {
			lb_policy feature_flag hero {
				test %s
				default %s
			}
			fail_duration 1m
			max_fails 1
			unhealthy_status 5xx
		}
	}
	handle {
		%s
	}
}`, globals(storage), defsFile, old.dial(), bad.dial(), bad.dial(), old.dial(), checkoutProxy(old, nu.upstream)))
	loadJSON(t, cfg)

	for i := 0; i < 40; i++ {
		get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("ex-%d", i)})
	}
	fallbacks := func() float64 {
		return metricSum(t, "caddy_feature_flags_fallbacks_total", map[string]string{"flag": "hero"})
	}
	before := fallbacks()
	n := 0
	eventually(t, 10*time.Second, "a fallback from the failing test upstream", func() bool {
		get(t, urlA+"hero", map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("hero-%d", n)})
		n++
		return fallbacks() > before
	})
	nu.failStatus.Store(http.StatusBadGateway)
	n = 0
	eventually(t, 20*time.Second, "the rollout to roll back", func() bool {
		for i := 0; i < 20; i++ {
			get(t, urlA, map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("ex-load-%d", n)})
			n++
		}
		return len(events.named("rollout_rolled_back")) > 0
	})
}

// exportedNames returns the sample names on the in-process /metrics.
func exportedNames(t *testing.T) map[string]bool {
	t.Helper()
	code, body := adminDo(t, http.MethodGet, adminURL+"/metrics", "")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	names := map[string]bool{}
	for _, line := range strings.Split(body, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if i := strings.IndexAny(line, "{ "); i > 0 {
			names[line[:i]] = true
		}
	}
	return names
}

// dashboardQueries returns every PromQL expression of the Grafana dashboard:
// panel targets, annotations, and the metric of each templating query.
func dashboardQueries(t *testing.T) (exprs, templateMetrics []string) {
	t.Helper()
	data, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name  string `json:"name"`
				Type  string `json:"type"`
				Query any    `json:"query"`
			} `json:"list"`
		} `json:"templating"`
		Annotations struct {
			List []struct {
				Expr string `json:"expr"`
			} `json:"list"`
		} `json:"annotations"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	hasFlag := false
	for _, p := range dash.Panels {
		for _, target := range p.Targets {
			if target.Expr == "" {
				t.Errorf("panel %q has a target without a query", p.Title)
			}
			exprs = append(exprs, target.Expr)
		}
	}
	for _, a := range dash.Annotations.List {
		exprs = append(exprs, a.Expr)
	}
	labelValues := regexp.MustCompile(`^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*(\w+)\s*\)$`)
	for _, v := range dash.Templating.List {
		if v.Type != "query" {
			continue
		}
		q, _ := v.Query.(map[string]any)["query"].(string)
		m := labelValues.FindStringSubmatch(q)
		if m == nil {
			t.Errorf("template variable %s: query %q is not label_values(<metric>, <label>)", v.Name, q)
			continue
		}
		templateMetrics = append(templateMetrics, m[1])
		hasFlag = hasFlag || v.Name == "flag" && m[2] == "flag"
	}
	if !hasFlag {
		t.Error("the dashboard has no flag template variable over the flag label")
	}
	return exprs, templateMetrics
}

// ruleQueries returns every rule expression of the alerting-rules file.
func ruleQueries(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(data, &rules); err != nil {
		t.Fatalf("%s: %v", rulesFile, err)
	}
	var exprs []string
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			exprs = append(exprs, r.Expr)
		}
	}
	return exprs
}

// PromQL pieces that are not metric names, removed before identifiers are
// read: string literals (label values), label matchers, range and subquery
// brackets, grouping and matching clauses with their label lists, offsets,
// Grafana's variables and numbers (durations included).
var (
	promString   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|` + "`[^`]*`")
	promMatchers = regexp.MustCompile(`\{[^{}]*\}`)
	promBrackets = regexp.MustCompile(`\[[^\[\]]*\]`)
	promClauses  = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)`)
	promOffset   = regexp.MustCompile(`\boffset\s+-?[0-9a-z]+`)
	promVariable = regexp.MustCompile(`\$\{?\w+\}?`)
	promNumber   = regexp.MustCompile(`\b\d[\w.]*`)
	promIdent    = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*(\s*\()?`)
	promKeywords = []string{"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "inf", "nan"}
)

// metricNames returns the metric names a PromQL expression selects:
// identifiers that are neither functions or aggregations (followed by a
// parenthesis) nor keywords.
func metricNames(expr string) []string {
	s := promString.ReplaceAllString(expr, " ")
	s = promMatchers.ReplaceAllString(s, " ")
	s = promBrackets.ReplaceAllString(s, " ")
	s = promClauses.ReplaceAllString(s, " ")
	s = promOffset.ReplaceAllString(s, " ")
	s = promVariable.ReplaceAllString(s, " ")
	s = promNumber.ReplaceAllString(s, " ")
	var names []string
	for _, m := range promIdent.FindAllStringSubmatch(s, -1) {
		if m[1] != "" || slices.Contains(promKeywords, strings.ToLower(m[0])) {
			continue
		}
		names = append(names, m[0])
	}
	return names
}

func TestMetricNamesAreReadFromPromQL(t *testing.T) {
	for expr, want := range map[string][]string{
		`sum by (flag, le) (rate(caddy_feature_flags_request_duration_seconds_bucket{flag=~"$flag", code_class=~"5xx|error"}[$__rate_interval]))`: {"caddy_feature_flags_request_duration_seconds_bucket"},
		`a_total unless a_total offset 15m or b > 0.05 and on (instance, job) increase(c[10m]) > bool 1e3`:                                        {"a_total", "a_total", "b", "c"},
		`time() - max without (job) (x{a="{b}"}) / sum(y[5m:1m])`:                                                                                 {"x", "y"},
	} {
		if got := metricNames(expr); !slices.Equal(got, want) {
			t.Errorf("metricNames(%q) = %q, want %q", expr, got, want)
		}
	}
}

// TestExamplesUseOnlyExportedMetrics checks every metric name of the
// dashboard and the alerting rules against a real Caddy's /metrics.
func TestExamplesUseOnlyExportedMetrics(t *testing.T) {
	exprs, templated := dashboardQueries(t)
	rules := ruleQueries(t)
	if len(exprs) < 10 || len(rules) < 4 {
		t.Fatalf("%d dashboard queries and %d rules: the examples were not read", len(exprs), len(rules))
	}
	used := map[string][]string{} // metric name -> where
	for _, m := range templated {
		used[m] = append(used[m], "dashboard variable")
	}
	for _, e := range exprs {
		names := metricNames(e)
		if len(names) == 0 && !strings.HasPrefix(e, "time()") {
			t.Errorf("dashboard query %q uses no metric", e)
		}
		for _, n := range names {
			used[n] = append(used[n], "dashboard")
		}
	}
	for _, e := range rules {
		names := metricNames(e)
		if len(names) == 0 {
			t.Errorf("rule %q uses no metric", e)
		}
		for _, n := range names {
			used[n] = append(used[n], "rules")
		}
	}

	exampleTraffic(t)
	exported := exportedNames(t)
	for name, where := range used {
		if !strings.HasPrefix(name, metricsNamespace+"_"+metricsSubsystem+"_") {
			t.Errorf("%s (%s) is not one of the plugin's metrics", name, slices.Compact(where))
			continue
		}
		if !exported[name] {
			t.Errorf("%s (used by the %s) is not on /metrics after traffic", name, strings.Join(slices.Compact(where), ", "))
		}
	}
	t.Logf("%d metric names, used by %d dashboard queries and %d rules, all on /metrics", len(used), len(exprs), len(rules))
}

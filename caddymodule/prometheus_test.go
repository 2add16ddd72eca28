//go:build prometheus

package caddymodule

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// This test needs the prometheus binary (Debian's package `prometheus`,
// which .ci/run installs), so it is built only with -tags prometheus:
//
//	go test -tags prometheus ./caddymodule -run TestARealPrometheus

// prometheusServer is a Prometheus child process and its HTTP API address.
type prometheusServer struct {
	api string // http://127.0.0.1:<port>
	mu  sync.Mutex
	log strings.Builder
}

func (p *prometheusServer) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

// listeningOn is Prometheus's log line naming the address its web listener
// actually bound (the configured one is 127.0.0.1:0); readyLine the one that
// says its API answers (before it, it is 503 while the TSDB opens).
var (
	listeningOn = regexp.MustCompile(`msg="Listening on" address=(127\.0\.0\.1:\d+)`)
	readyLine   = `msg="Server is ready to receive web requests."`
)

// startPrometheus runs Prometheus with config. It binds its own port (the
// kernel picks one for 127.0.0.1:0), which it names in its log: the test
// reads it there, so there is no port to guess and no race for one, and
// waits for the log line that says the API is ready.
func startPrometheus(t *testing.T, config string) *prometheusServer {
	t.Helper()
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatalf("the prometheus binary is needed for this test (Debian: apt-get install prometheus; .ci/run installs it): %v", err)
	}
	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgFile, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config.file="+cfgFile, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address=127.0.0.1:0", "--log.format=logfmt")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	p := &prometheusServer{}
	ready := make(chan string, 1)
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		var addr string
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.log.WriteString(line + "\n")
			p.mu.Unlock()
			if m := listeningOn.FindStringSubmatch(line); m != nil {
				addr = m[1]
			}
			if strings.Contains(line, readyLine) && addr != "" {
				select {
				case ready <- addr:
				default:
				}
			}
		}
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("prometheus log:\n%s", p.output())
		}
	})
	select {
	case a := <-ready:
		p.api = "http://" + a
	case <-done:
		t.Fatalf("prometheus exited before it was ready:\n%s", p.output())
	case <-time.After(60 * time.Second):
		t.Fatalf("prometheus was not ready, or did not say where it listens:\n%s", p.output())
	}
	return p
}

// get calls the Prometheus HTTP API and decodes its data.
func (p *prometheusServer) get(t *testing.T, path string, data any) {
	t.Helper()
	resp, err := http.Get(p.api + path)
	if err != nil {
		t.Fatalf("prometheus %s: %v", path, err)
	}
	defer resp.Body.Close()
	var body struct {
		Status string          `json:"status"`
		Error  string          `json:"error"`
		Data   json.RawMessage `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || body.Status != "success" {
		t.Fatalf("prometheus %s: %s %s (%v)", path, body.Status, body.Error, err)
	}
	if err := json.Unmarshal(body.Data, data); err != nil {
		t.Fatalf("prometheus %s: %v", path, err)
	}
}

type promSample struct {
	Metric map[string]string `json:"metric"`
}

// TestARealPrometheusScrapesCaddyAndEvaluatesTheRules runs Prometheus with
// the example alerting rules against the in-process Caddy's metrics, after
// traffic in which a rollout is rolled back: the scrape is healthy, the
// rollback rule's expression finds the rollback, its alert fires, and every
// rule evaluates without error on the real series.
func TestARealPrometheusScrapesCaddyAndEvaluatesTheRules(t *testing.T) {
	exampleTraffic(t)
	rules, err := filepath.Abs(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	target := strings.TrimPrefix(adminURL, "http://")
	p := startPrometheus(t, fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - %q
scrape_configs:
  - job_name: caddy
    metrics_path: /metrics
    static_configs:
      - targets: [%q]
`, rules, target))

	var lastErr string
	eventually(t, 60*time.Second, "prometheus to scrape caddy", func() bool {
		var targets struct {
			Active []struct {
				Health    string `json:"health"`
				LastError string `json:"lastError"`
				ScrapeURL string `json:"scrapeUrl"`
			} `json:"activeTargets"`
		}
		p.get(t, "/api/v1/targets", &targets)
		if len(targets.Active) == 1 {
			lastErr = targets.Active[0].LastError
		}
		return len(targets.Active) == 1 && targets.Active[0].Health == "up"
	})
	if lastErr != "" {
		t.Logf("last scrape error before up: %s", lastErr)
	}

	// The rule's own expression, as Prometheus evaluates it.
	var expr string
	for _, e := range ruleQueries(t) {
		if strings.Contains(e, "rollbacks_total") {
			expr = e
		}
	}
	var result struct {
		Result []promSample `json:"result"`
	}
	p.get(t, "/api/v1/query?query="+url.QueryEscape(expr), &result)
	if len(result.Result) != 1 || result.Result[0].Metric["flag"] != "checkout" || result.Result[0].Metric["guardrail"] != "error_rate 2x" {
		t.Fatalf("rollback rule expression: %+v, want one series for checkout's error_rate 2x", result.Result)
	}

	eventually(t, 60*time.Second, "the rollback alert to fire and every rule to be evaluated", func() bool {
		var alerts struct {
			Alerts []struct {
				Labels map[string]string `json:"labels"`
				State  string            `json:"state"`
			} `json:"alerts"`
		}
		p.get(t, "/api/v1/alerts", &alerts)
		firing := false
		for _, a := range alerts.Alerts {
			if a.Labels["alertname"] == "FlagsplitRolloutRolledBack" && a.Labels["flag"] == "checkout" && a.State == "firing" {
				firing = true
			}
		}
		var rules struct {
			Groups []struct {
				Rules []struct {
					Name           string    `json:"name"`
					Health         string    `json:"health"`
					LastError      string    `json:"lastError"`
					LastEvaluation time.Time `json:"lastEvaluation"`
				} `json:"rules"`
			} `json:"groups"`
		}
		p.get(t, "/api/v1/rules", &rules)
		evaluated := 0
		for _, g := range rules.Groups {
			for _, r := range g.Rules {
				if r.Health == "err" {
					t.Fatalf("rule %s fails on the real series: %s", r.Name, r.LastError)
				}
				if r.Health == "ok" && !r.LastEvaluation.IsZero() {
					evaluated++
				}
			}
		}
		return firing && evaluated == len(ruleQueries(t))
	})
}

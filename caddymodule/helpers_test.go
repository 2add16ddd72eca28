package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"go.uber.org/zap"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/proxy"
	"github.com/flagsplit/flagsplit/storedoc/storedoctest"
)

// The end-to-end tests of this package run real Caddy: the tests' own
// in-process Caddy, loaded with each test's config in turn (tests therefore
// never run in parallel), and Caddy child processes (this test binary run as
// `caddy run`) for restarts and instances sharing a storage. Upstreams and the
// PostHog stand-in are real HTTP servers on loopback.
//
// Every listening socket is bound by the test and held for as long as it is
// needed, then handed to Caddy as a file descriptor (`bind fd/N`,
// `admin fd/N`): no port is picked and released for someone else to take,
// and since Caddy reuses a descriptor's socket across reloads instead of
// binding a new one beside the old, no connection is reset by a reload.

// runCaddyEnv makes the test binary act as the caddy command, so tests can run
// real Caddy processes built with exactly the code under test.
const runCaddyEnv = "FLAGSPLIT_TEST_RUN_CADDY"

// The in-process Caddy's addresses: its admin endpoint, and the two site
// listeners that configs written for :9080 and :9081 are bound to.
var (
	adminURL     string // http://127.0.0.1:<port>
	siteA, siteB string // 127.0.0.1:<port>
	urlA, urlB   string // http://127.0.0.1:<port>/
	heldFDs      map[string]uintptr
)

func TestMain(m *testing.M) {
	if os.Getenv(runCaddyEnv) == "1" {
		os.Args = append([]string{"caddy"}, os.Args[1:]...)
		caddycmd.Main()
		return
	}
	if storage := os.Getenv(holdLockEnv); storage != "" {
		holdOverridesLockUntilKilled(storage)
		return
	}
	code, err := runTests(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(code)
}

func runTests(m *testing.M) (int, error) {
	home, err := os.MkdirTemp("", "flagsplit-caddymodule-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(home)
	// Caddy's autosave and local CA data go to the run's own directory.
	os.Setenv("XDG_CONFIG_HOME", filepath.Join(home, "config"))
	os.Setenv("XDG_DATA_HOME", filepath.Join(home, "data"))
	heldFDs = map[string]uintptr{}
	var files []*os.File
	for _, name := range []string{"admin", ":9080", ":9081"} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		f, err := ln.(*net.TCPListener).File()
		if err != nil {
			return 0, err
		}
		files = append(files, f)
		heldFDs[name] = f.Fd()
		addr := ln.Addr().String()
		switch name {
		case "admin":
			adminURL = "http://" + addr
		case ":9080":
			siteA, urlA = addr, "http://"+addr+"/"
		case ":9081":
			siteB, urlB = addr, "http://"+addr+"/"
		}
	}
	// Quiet until a test's config sends the log to its own file.
	if err := tryLoad([]byte(idleConfig())); err != nil {
		return 0, err
	}
	code := m.Run()
	_ = caddy.Stop()
	for _, f := range files {
		f.Close()
	}
	return code, nil
}

// globals are the global options of every in-process test config: the held
// admin socket, plain HTTP, quick reloads, and a storage of the test's own,
// beside which Caddy's log goes (caddy.log; printed when the test fails).
func globals(storage string) string {
	return fmt.Sprintf(`
	admin fd/%d
	persist_config off
	grace_period 1ns
	skip_install_trust
	auto_https off
	storage file_system %s
	log {
		output file %s
		format json
	}
`, heldFDs["admin"], storage, filepath.Join(storage, "caddy.log"))
}

// logOf returns the in-process Caddy's log lines of a config whose globals
// were given storage.
func logOf(t testing.TB, storage string) []map[string]any {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(storage, "caddy.log"))
	if err != nil {
		t.Fatal(err)
	}
	var lines []map[string]any
	for _, line := range bytes.Split(data, []byte("\n")) {
		var m map[string]any
		if json.Unmarshal(line, &m) == nil {
			lines = append(lines, m)
		}
	}
	return lines
}

// idleConfig is loaded after each test: it stops the test's config (its
// pollers, tickers and sockets' users) so that nothing of it reaches the
// next test.
func idleConfig() string {
	return fmt.Sprintf(`{"admin": {"listen": "fd/%d", "config": {"persist": false}},
		"logging": {"logs": {"default": {"writer": {"output": "discard"}}}}}`, heldFDs["admin"])
}

// bindSites binds the sites a test config writes as `:9080 {` and `:9081 {`
// to the held sockets.
func bindSites(caddyfile string) string {
	for _, site := range []string{":9080", ":9081"} {
		caddyfile = strings.ReplaceAll(caddyfile, "\n"+site+" {\n", fmt.Sprintf("\n%s {\n\tbind fd/%d\n", site, heldFDs[site]))
	}
	return caddyfile
}

// adapt turns a test Caddyfile into JSON, its sites bound to the held sockets.
func adapt(t testing.TB, caddyfile string) []byte {
	t.Helper()
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(bindSites(caddyfile)), nil)
	if err != nil {
		t.Fatalf("adapting the test config: %v", err)
	}
	return cfg
}

// load runs a Caddyfile in the in-process Caddy, replacing the running config.
func load(t testing.TB, caddyfile string) {
	t.Helper()
	loadJSON(t, adapt(t, caddyfile))
}

// loadJSON runs a JSON config in the in-process Caddy. The first load of a
// test registers the unload that ends it.
func loadJSON(t testing.TB, cfg []byte) {
	t.Helper()
	if err := tryLoad(cfg); err != nil {
		t.Fatalf("loading the test config: %v", err)
	}
	if _, done := unloads.LoadOrStore(t.Name(), true); !done {
		t.Cleanup(func() {
			unloads.Delete(t.Name())
			if err := tryLoad([]byte(idleConfig())); err != nil {
				t.Errorf("unloading the test config: %v", err)
			}
		})
	}
}

// unloads notes the tests whose unload is registered.
var unloads sync.Map

func tryLoad(cfg []byte) error { return caddy.Load(cfg, true) }

// eventually waits until cond holds, checking it every 10ms, and fails the
// test when it has not held within timeout. It is the one way these tests
// wait for something: always for a positive signal.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		<-tick.C
	}
}

// upstream is a loopback HTTP server that answers with its name and the request
// headers it received.
type upstream struct {
	name string
	srv  *httptest.Server
	hits atomic.Int64
}

type echo struct {
	Upstream string      `json:"upstream"`
	Headers  http.Header `json:"headers"`
}

func newUpstream(t *testing.T, name string) *upstream {
	t.Helper()
	u := &upstream{name: name}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.hits.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(echo{Upstream: name, Headers: r.Header})
	}))
	t.Cleanup(u.srv.Close)
	return u
}

func (u *upstream) dial() string { return u.srv.Listener.Addr().String() }

// switchableUpstream answers like upstream, or with failStatus while it is set.
type switchableUpstream struct {
	*upstream
	failStatus atomic.Int64
}

func newSwitchableUpstream(t *testing.T, name string) *switchableUpstream {
	su := &switchableUpstream{upstream: &upstream{name: name}}
	su.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		su.hits.Add(1)
		if code := su.failStatus.Load(); code != 0 {
			w.Header().Set("X-Upstream", name)
			w.WriteHeader(int(code))
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(echo{Upstream: name, Headers: r.Header})
	}))
	t.Cleanup(su.srv.Close)
	return su
}

// client talks to the test Caddy's sites without a cookie jar, so each test
// controls exactly which cookies a request carries.
var client = &http.Client{Timeout: 10 * time.Second, Transport: resendUnanswered{http.DefaultTransport}}

// adminClient opens a connection per request: a reload replaces Caddy's admin
// server, and a kept-alive connection to the replaced one may be closed under
// a request that cannot be retried (PUT, POST, DELETE).
var adminClient = &http.Client{Timeout: 30 * time.Second, Transport: resendUnanswered{&http.Transport{DisableKeepAlives: true}}}

// resendUnanswered sends a request again when the connection closed before
// any answer. A config load replaces Caddy's servers (the admin endpoint's
// among them) and shuts the old ones down; Go's http.Server closes a
// connection whose request it reads while it shuts down, before any handler
// sees the request, so the request was not served and is sent again (up to
// three times).
type resendUnanswered struct{ base http.RoundTripper }

func (rt resendUnanswered) RoundTrip(req *http.Request) (*http.Response, error) {
	for attempt := 0; ; attempt++ {
		resp, err := rt.base.RoundTrip(req)
		if err == nil || attempt == 2 || !errors.Is(err, io.EOF) || (req.Body != nil && req.GetBody == nil) {
			return resp, err
		}
		if req.GetBody != nil {
			body, berr := req.GetBody()
			if berr != nil {
				return nil, err
			}
			req = req.Clone(req.Context())
			req.Body = body
		}
	}
}

func get(t testing.TB, rawURL string, headers map[string]string, cookies ...*http.Cookie) (*http.Response, echo) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, rawURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	for _, c := range cookies {
		req.AddCookie(c)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", rawURL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var e echo
	if resp.StatusCode == http.StatusOK && strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		if err := json.Unmarshal(body, &e); err != nil {
			t.Fatalf("%s: %v: %s", rawURL, err, body)
		}
	} else {
		e.Upstream = string(body)
	}
	return resp, e
}

// routesTo asks for n users on addr and reports the upstream they all reached,
// or "mixed".
func routesTo(t testing.TB, addr string, n int) string {
	t.Helper()
	seen := ""
	for i := 0; i < n; i++ {
		resp, e := get(t, "http://"+addr+"/", map[string]string{"X-POSTHOG-DISTINCT-ID": fmt.Sprintf("visitor-%d", i)})
		if resp.StatusCode != http.StatusOK {
			return fmt.Sprintf("status %d", resp.StatusCode)
		}
		if seen == "" {
			seen = e.Upstream
		} else if seen != e.Upstream {
			return "mixed"
		}
	}
	return seen
}

// adminDo sends a request to an admin API and returns status and body.
func adminDo(t testing.TB, method, url, body string) (int, string) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := adminClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(out)
}

func adminStatusOf(t *testing.T, admin string) adminStatus {
	t.Helper()
	code, body := adminDo(t, http.MethodGet, admin+"/feature_flags/", "")
	var st adminStatus
	if code != http.StatusOK || json.Unmarshal([]byte(body), &st) != nil {
		t.Fatalf("status from %s: %d %s", admin, code, body)
	}
	return st
}

// metricValue reads one unlabelled sample from the in-process admin /metrics.
func metricValue(t testing.TB, name string) float64 {
	t.Helper()
	return metricSum(t, name, nil)
}

// metricSum adds the samples of a metric whose labels include all of want.
// The collectors outlive configs (as in production), so tests compare values
// before and after what they do, never absolute values.
func metricSum(t testing.TB, name string, want map[string]string) float64 {
	t.Helper()
	_, body := adminDo(t, http.MethodGet, adminURL+"/metrics", "")
	sum := 0.0
	for _, line := range strings.Split(body, "\n") {
		if !strings.HasPrefix(line, name) || strings.HasPrefix(line, "#") {
			continue
		}
		rest := line[len(name):]
		if rest == "" || (rest[0] != '{' && rest[0] != ' ') {
			continue
		}
		ok := true
		for k, v := range want {
			if !strings.Contains(rest, fmt.Sprintf(`%s="%s"`, k, v)) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		var v float64
		fields := strings.Fields(rest[strings.LastIndex(rest, "}")+1:])
		if len(fields) > 0 {
			fmt.Sscan(fields[0], &v)
		}
		sum += v
	}
	return sum
}

// writeFileAtomically replaces path the way deploy tools do: write aside, rename.
func writeFileAtomically(t testing.TB, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// vectors loads a consistency vector file: the definitions and id -> expected value.
func vectors(t *testing.T, file string) (flags json.RawMessage, expect map[string]string, ids []string) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "eval", "testdata", "conformance", file))
	if err != nil {
		t.Fatal(err)
	}
	var suites []struct {
		Flags json.RawMessage `json:"flags"`
		Cases []struct {
			DistinctID string `json:"distinct_id"`
			Expect     any    `json:"expect"`
		} `json:"cases"`
	}
	if err := json.Unmarshal(data, &suites); err != nil {
		t.Fatal(err)
	}
	expect = map[string]string{}
	for _, c := range suites[0].Cases {
		expect[c.DistinctID] = fmt.Sprint(c.Expect)
		ids = append(ids, c.DistinctID)
	}
	return suites[0].Flags, expect, ids
}

// mergeFlags combines the flags of several definitions documents.
func mergeFlags(t *testing.T, docs ...json.RawMessage) []byte {
	t.Helper()
	var all []json.RawMessage
	for _, d := range docs {
		var doc struct {
			Flags []json.RawMessage `json:"flags"`
		}
		if err := json.Unmarshal(d, &doc); err != nil {
			t.Fatal(err)
		}
		all = append(all, doc.Flags...)
	}
	out, err := json.Marshal(map[string]any{"flags": all, "group_type_mapping": map[string]string{}, "cohorts": map[string]any{}})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// caddyProcess is a Caddy running as a child process, on sockets the test
// holds: a restart finds them where they were, and nothing else can take
// them in between.
type caddyProcess struct {
	t      *testing.T
	cmd    *exec.Cmd
	config string
	log    *bytes.Buffer
	done   chan struct{}
	// ports are the held sockets, handed to the child as fd 3, 4, ...
	ports *instancePorts
}

// instancePorts are the sockets of one Caddy instance: its admin endpoint
// and one site.
type instancePorts struct {
	admin, site net.Listener
	// adminURL is http://127.0.0.1:<port>; siteAddr is 127.0.0.1:<port>.
	adminURL, siteAddr string
}

// reservePorts binds an instance's sockets for the rest of the test.
func reservePorts(t *testing.T) *instancePorts {
	t.Helper()
	p := &instancePorts{}
	for _, ln := range []*net.Listener{&p.admin, &p.site} {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		*ln = l
	}
	p.adminURL, p.siteAddr = "http://"+p.admin.Addr().String(), p.site.Addr().String()
	return p
}

// Child processes receive the admin socket as fd 3 and the site's as fd 4.
const (
	childAdmin = "admin fd/3\n\tpersist_config off"
	childSite  = ":80 {\n\tbind fd/4"
)

// startCaddy runs the test binary as `caddy run` with the Caddyfile and waits
// until its admin endpoint answers.
func startCaddy(t *testing.T, ports *instancePorts, caddyfile string) *caddyProcess {
	t.Helper()
	config := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(config, []byte(caddyfile), 0o600); err != nil {
		t.Fatal(err)
	}
	return restartCaddy(t, ports, config)
}

// restartCaddy runs a Caddy with the config file of an earlier one.
func restartCaddy(t *testing.T, ports *instancePorts, config string) *caddyProcess {
	t.Helper()
	p := &caddyProcess{t: t, config: config, log: &bytes.Buffer{}, done: make(chan struct{}), ports: ports}
	// Not os.Args[0]: a relative path would break if a test changed the
	// working directory.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var files []*os.File
	for _, ln := range []net.Listener{ports.admin, ports.site} {
		f, err := ln.(*net.TCPListener).File()
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	p.cmd = exec.Command(self, "run", "--config", config, "--adapter", "caddyfile")
	dir := filepath.Dir(config)
	p.cmd.Env = append(os.Environ(), runCaddyEnv+"=1",
		"XDG_CONFIG_HOME="+filepath.Join(dir, "config"), "XDG_DATA_HOME="+filepath.Join(dir, "data"))
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	p.cmd.ExtraFiles = files
	err = p.cmd.Start()
	for _, f := range files {
		f.Close() // the child has its own copies
	}
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(p.stop)
	// The admin socket is already listening (the test holds it), so this
	// request waits in its backlog until Caddy serves it: no polling.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	go func() {
		select {
		case <-p.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ports.adminURL+"/config/", nil)
	resp, err := (&http.Client{}).Do(req)
	if err != nil {
		t.Fatalf("caddy did not start (%v):\n%s", err, p.output())
	}
	resp.Body.Close()
	return p
}

func (p *caddyProcess) output() string {
	select {
	case <-p.done:
		return p.log.String()
	default:
		return "(still running)"
	}
}

// stop shuts Caddy down gracefully (SIGTERM), as an operator's restart would.
func (p *caddyProcess) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func init() {
	caddy.RegisterModule(eventRecorder{})
}

// recorded holds the Caddy events each test's recorder received, by
// recorder id.
var recorded struct {
	sync.Mutex
	byID map[string][]caddy.Event
	seq  int
}

// eventRecorder is an events handler that keeps every event it is given, so
// tests can see what flagsplit emits through Caddy's events app. Each test
// has its own (its id), so a config still running from an earlier test can
// never add to what a later one sees.
type eventRecorder struct {
	ID string `json:"id"`
}

func (eventRecorder) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "events.handlers.flagsplit_test_recorder", New: func() caddy.Module { return new(eventRecorder) }}
}

func (r eventRecorder) Handle(_ context.Context, e caddy.Event) error {
	recorded.Lock()
	recorded.byID[r.ID] = append(recorded.byID[r.ID], e)
	recorded.Unlock()
	return nil
}

var _ caddyevents.Handler = eventRecorder{}

// caddyEvents is what one recorder received.
type caddyEvents struct{ id string }

// named returns the events called name, in the order they came.
func (ev caddyEvents) named(name string) []caddy.Event {
	recorded.Lock()
	defer recorded.Unlock()
	var out []caddy.Event
	for _, e := range recorded.byID[ev.id] {
		if e.Name() == name {
			out = append(out, e)
		}
	}
	return out
}

// withEventRecorder adapts a Caddyfile and subscribes a recorder of the
// test's own to every event.
func withEventRecorder(t *testing.T, caddyfile string) ([]byte, caddyEvents) {
	t.Helper()
	var cfg map[string]any
	if err := json.Unmarshal(adapt(t, caddyfile), &cfg); err != nil {
		t.Fatal(err)
	}
	recorded.Lock()
	if recorded.byID == nil {
		recorded.byID = map[string][]caddy.Event{}
	}
	recorded.seq++
	id := fmt.Sprintf("%s#%d", t.Name(), recorded.seq)
	recorded.Unlock()
	cfg["apps"].(map[string]any)["events"] = map[string]any{
		"subscriptions": []any{map[string]any{"handlers": []any{map[string]any{"handler": "flagsplit_test_recorder", "id": id}}}},
	}
	out, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return out, caddyEvents{id: id}
}

// Unit-test helpers: the app, handler and policy without a Caddy config.

// testClock is a manual clock: time moves only when the test says, and the
// tickers of the app's background work fire on Advance.
type testClock struct {
	mu      sync.Mutex
	now     time.Time
	tickers []*testTicker
}

type testTicker struct {
	c      chan time.Time
	every  time.Duration
	next   time.Time
	active bool
}

func newTestClock() *testClock {
	return &testClock{now: time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)}
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) NewTicker(d time.Duration) (<-chan time.Time, func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	tk := &testTicker{c: make(chan time.Time, 1), every: d, next: c.now.Add(d), active: true}
	c.tickers = append(c.tickers, tk)
	return tk.c, func() { c.mu.Lock(); tk.active = false; c.mu.Unlock() }
}

// Advance moves the clock and fires the tickers that came due (a ticker
// that is not read drops ticks, as time.Ticker does).
func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	for _, tk := range c.tickers {
		for tk.active && !tk.next.After(c.now) {
			select {
			case tk.c <- tk.next:
			default:
			}
			tk.next = tk.next.Add(tk.every)
		}
	}
}

// testApp is an App built without a Caddy config: in-memory storage, a
// manual clock, and the definitions given.
type testApp struct {
	*App
	storage *storedoctest.Memory
	clock   *testClock
}

func newTestApp(t testing.TB, defs []byte, cacheSize int) *testApp {
	t.Helper()
	return newTestAppOn(t, storedoctest.NewMemory(), defs, cacheSize)
}

// newTestAppOn builds a test app over a given storage (several apps over one
// storage are instances sharing it).
func newTestAppOn(t testing.TB, st *storedoctest.Memory, defs []byte, cacheSize int) *testApp {
	t.Helper()
	clock := newTestClock()
	app := &App{CacheSize: &cacheSize, logger: zap.NewNop(), implicit: new(implicitHandler), refs: new(references), wg: new(sync.WaitGroup),
		clock: clock, storage: st, SyncInterval: DefaultSyncInterval, StaleAfter: DefaultStaleAfter}
	app.engine = newEngine(cacheSize, clock.Now)
	app.docs = app.newDocuments(st)
	if _, err := app.engine.install(definitionsSource{kind: sourceFile, location: "test"}, defs); err != nil {
		t.Fatalf("definitions: %v", err)
	}
	if err := app.provisionRollouts(); err != nil {
		t.Fatal(err)
	}
	return &testApp{App: app, storage: st, clock: clock}
}

// startTestRollout puts a rollout in force on app without a Caddy config.
func startTestRollout(t testing.TB, app *testApp, rc *RolloutConfig) {
	t.Helper()
	app.Rollouts = append(app.Rollouts, rc)
	if err := app.provisionRollouts(); err != nil {
		t.Fatal(err)
	}
	app.engine.rollouts.Start(context.Background(), app.rollouts, app.docs.rollouts, app.rolloutHooks())
	app.engine.apply()
}

func newTestHandler(t testing.TB, app *testApp) *Handler {
	t.Helper()
	h := &Handler{PersonProperties: map[string]string{
		"plan":        "{http.request.header.X-Plan}",
		"country":     "{http.request.header.X-Country}",
		"orders":      "{http.request.header.X-Orders}",
		"app_version": "{http.request.header.X-App-Version}",
	}}
	if err := h.setup(app.App, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	return h
}

func newTestPolicy(t testing.TB, app *testApp, flag string) *SelectionPolicy {
	t.Helper()
	p := &SelectionPolicy{Flag: flag, Routes: map[string]string{"true": "new:8080", "b": "new:8080"}, Default: "old:8080"}
	router, err := proxy.NewRouter(p.Routes, p.Default)
	if err != nil {
		t.Fatal(err)
	}
	p.router, p.app, p.logger = router, app.App, zap.NewNop()
	return p
}

// discardWriter is a ResponseWriter that keeps nothing, reused across iterations.
type discardWriter struct{ h http.Header }

func (d *discardWriter) Header() http.Header         { return d.h }
func (d *discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (d *discardWriter) WriteHeader(int)             {}

var benchServer = new(caddyhttp.Server)

// prepare builds a request the way Caddy's server does before the handler chain.
func prepare(w http.ResponseWriter, id string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "http://shop.example.com/checkout", nil)
	r.Header.Set("X-POSTHOG-DISTINCT-ID", id)
	r.Header.Set("X-Plan", "pro")
	r.Header.Set("X-Country", "US")
	r.Header.Set("X-Orders", "12")
	r.Header.Set("X-App-Version", "2.3.1")
	return caddyhttp.PrepareRequest(r, caddy.NewReplacer(), w, benchServer)
}

func hashOf(key, id string) float64 { return eval.Hash(key, id, "") }

package caddymodule

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// runCaddyEnv makes the test binary act as the caddy command, so tests can run
// real Caddy processes (restarts, several instances sharing storage) built with
// exactly the code under test.
const runCaddyEnv = "FLAGSPLIT_TEST_RUN_CADDY"

// inProcessRoot holds the files of configs loaded into caddytest's in-process
// Caddy. That Caddy keeps running a test's config until the next test loads its
// own (and writes flag activity when it stops it), so those files cannot live
// in t.TempDir(); they are removed after Caddy stops, at the end of the run.
var inProcessRoot string

func TestMain(m *testing.M) {
	if os.Getenv(runCaddyEnv) == "1" {
		os.Args = append([]string{"caddy"}, os.Args[1:]...)
		caddycmd.Main()
		return
	}
	var err error
	if inProcessRoot, err = os.MkdirTemp("", "flagsplit-caddymodule-"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	_ = caddy.Stop()
	_ = os.RemoveAll(inProcessRoot)
	os.Exit(code)
}

// inProcessDir returns a fresh directory for a config of the in-process Caddy.
func inProcessDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp(inProcessRoot, strings.ReplaceAll(t.Name(), "/", "_")+"-")
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// caddyProcess is a Caddy running as a child process.
type caddyProcess struct {
	t      *testing.T
	cmd    *exec.Cmd
	admin  string
	config string
	log    *bytes.Buffer
	done   chan struct{}
}

// freePort returns a loopback port nothing listens on right now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startCaddy runs the test binary as `caddy run` with the Caddyfile, and waits
// for its admin endpoint.
func startCaddy(t *testing.T, adminPort int, caddyfile string) *caddyProcess {
	t.Helper()
	dir := t.TempDir()
	config := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(config, []byte(caddyfile), 0o600); err != nil {
		t.Fatal(err)
	}
	return startCaddyConfig(t, adminPort, config)
}

func startCaddyConfig(t *testing.T, adminPort int, config string) *caddyProcess {
	t.Helper()
	p := &caddyProcess{t: t, admin: fmt.Sprintf("http://localhost:%d", adminPort), config: config, log: &bytes.Buffer{}, done: make(chan struct{})}
	// Not os.Args[0]: the in-process Caddy of caddytest rewrites os.Args.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd = exec.Command(self, "run", "--config", config, "--adapter", "caddyfile")
	p.cmd.Env = append(os.Environ(), runCaddyEnv+"=1",
		"XDG_CONFIG_HOME="+filepath.Join(filepath.Dir(config), "config"), "XDG_DATA_HOME="+filepath.Join(filepath.Dir(config), "data"))
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(p.stop)
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(p.admin + "/config/")
		if err == nil {
			resp.Body.Close()
			return p
		}
		select {
		case <-p.done:
			t.Fatalf("caddy exited during start:\n%s", p.log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy did not start:\n%s", p.log)
		}
		time.Sleep(50 * time.Millisecond)
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
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// adminDo sends a request to the admin API and returns status and body.
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
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(out)
}

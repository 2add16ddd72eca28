package caddymodule

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/storedoc"
)

// fileSite is a Caddyfile with definitions from defsFile and the checkout
// routing of the control tests, on the storage directory given.
func fileSite(storage, defsFile string, old, nu *upstream) string {
	return fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
	}
}
:9080 {
	feature_flags
	%s
}`, globals(storage), defsFile, checkoutProxy(old, nu))
}

// storedOverridesFile is where the file_system storage keeps the overrides
// of a config without a posthog block.
func storedOverridesFile(storage string) string {
	return filepath.Join(storage, "feature_flags", "local", "overrides.json")
}

// loggedWith reports whether the config's log has a line with msg whose
// fields include want.
func loggedWith(t *testing.T, storage, msg string, want map[string]string) bool {
	t.Helper()
	for _, line := range logOf(t, storage) {
		if line["msg"] != msg {
			continue
		}
		ok := true
		for k, v := range want {
			if fmt.Sprint(line[k]) != v {
				ok = false
			}
		}
		if ok {
			return true
		}
	}
	return false
}

// Row 1 of the hostile-input probe: a kill switch set through the admin API,
// the stored overrides damaged while Caddy is stopped, Caddy started again.
// The flag is still killed (from the backup copy), the damage is logged and
// counted, and both a PUT and a DELETE work.
func TestAKillSwitchSurvivesDamageToTheStoredOverrides(t *testing.T) {
	damages := []struct {
		name   string
		damage func([]byte) []byte
	}{
		{"truncated", func(b []byte) []byte { return b[:len(b)/2] }},
		{"empty", func([]byte) []byte { return nil }},
		{"random bytes", func([]byte) []byte { return []byte{0xde, 0xad, 0xbe, 0xef, 0x00, 0x7b, 0xfe} }},
		{"wrong shape", func([]byte) []byte { return []byte("[]") }},
		{"null", func([]byte) []byte { return []byte("null") }},
	}
	for _, c := range damages {
		t.Run(c.name, func(t *testing.T) {
			defsFile := filepath.Join(t.TempDir(), "flags.json")
			writeFileAtomically(t, defsFile, checkoutDefs(100))
			old, nu := newUpstream(t, "old"), newUpstream(t, "new")
			storage := t.TempDir()
			config := fileSite(storage, defsFile, old, nu)
			load(t, config)
			if got := routesTo(t, siteA, 10); got != "new" {
				t.Fatalf("before the kill switch: %s", got)
			}
			if code, body := adminDo(t, http.MethodPut, adminURL+"/feature_flags/overrides/checkout", `{"killed": true}`); code != http.StatusOK {
				t.Fatalf("PUT: %d %s", code, body)
			}

			// The collectors outlive configs: read it while this one runs.
			damaged := metricSum(t, "caddy_feature_flags_storage_damaged_total", map[string]string{"document": "overrides"})
			// Stopped: the engine and everything in force go away.
			if err := tryLoad([]byte(idleConfig())); err != nil {
				t.Fatal(err)
			}
			file := storedOverridesFile(storage)
			good, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			bad := c.damage(good)
			if err := os.WriteFile(file, bad, 0o600); err != nil {
				t.Fatal(err)
			}

			load(t, config)
			if got := routesTo(t, siteA, 20); got != "old" {
				t.Fatalf("after the restart over damaged overrides: %s (the kill switch was lost)", got)
			}
			if !loggedWith(t, storage, "stored document is damaged; using its last good copy", map[string]string{"document": "overrides", "using": "backup"}) {
				t.Error("the damage was not logged")
			}
			if got := metricSum(t, "caddy_feature_flags_storage_damaged_total", map[string]string{"document": "overrides"}); got != damaged+1 {
				t.Errorf("storage_damaged_total{document=overrides} went from %v to %v, want +1", damaged, got)
			}

			if code, body := adminDo(t, http.MethodDelete, adminURL+"/feature_flags/overrides/checkout", ""); code != http.StatusOK {
				t.Fatalf("DELETE over the damage: %d %s", code, body)
			}
			if got := routesTo(t, siteA, 10); got != "new" {
				t.Fatalf("after the DELETE: %s", got)
			}
			if code, body := adminDo(t, http.MethodPut, adminURL+"/feature_flags/overrides/checkout", `{"killed": true}`); code != http.StatusOK {
				t.Fatalf("PUT after the damage: %d %s", code, body)
			}
			if got := routesTo(t, siteA, 10); got != "old" {
				t.Fatalf("after the PUT: %s", got)
			}
			// Both copies are good again; the damaged bytes are kept aside.
			for _, f := range []string{file, file + ".backup"} {
				var doc struct {
					Overrides map[string]eval.Override `json:"overrides"`
				}
				data, err := os.ReadFile(f)
				if err != nil || json.Unmarshal(data, &doc) != nil || !doc.Overrides["checkout"].Killed {
					t.Errorf("%s: %s %v", f, data, err)
				}
			}
			if aside, err := os.ReadFile(file + ".unreadable"); err != nil || !bytes.Equal(aside, bad) {
				t.Errorf("kept aside: %q %v, want %q", aside, err, bad)
			}
		})
	}
}

// manyFlags is a definitions document of n boolean flags f0 ... f<n-1>.
func manyFlags(n int) []byte {
	flags := make([]string, n)
	for i := range flags {
		flags[i] = fmt.Sprintf(`{"key": "f%d", "active": true, "filters": {"groups": [{"rollout_percentage": 100}]}}`, i)
	}
	return []byte(`{"flags": [` + strings.Join(flags, ",") + `]}`)
}

// putInParallel sends PUT {"killed": true} for f0 ... f<n-1> at once and
// returns each answer's status and how long it took.
func putInParallel(n int) (codes []int, took []time.Duration, errs []error) {
	codes, took, errs = make([]int, n), make([]time.Duration, n), make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			t0 := time.Now()
			req, _ := http.NewRequest(http.MethodPut, fmt.Sprintf("%s/feature_flags/overrides/f%d", adminURL, i), strings.NewReader(`{"killed": true}`))
			resp, err := adminClient.Do(req)
			took[i] = time.Since(t0)
			if err != nil {
				errs[i] = err
				return
			}
			resp.Body.Close()
			codes[i] = resp.StatusCode
		}()
	}
	close(start)
	wg.Wait()
	return codes, took, errs
}

// Row 9: 200 parallel override PUTs against Caddy with file_system storage
// all land, in one stored document, and answer in far less than the 1 s
// the storage's lock polling costs each contended writer.
func TestTwoHundredParallelOverridePutsAllLandQuickly(t *testing.T) {
	const n = 200
	defsFile := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, defsFile, manyFlags(n))
	storage := t.TempDir()
	load(t, fmt.Sprintf(`{
	%s
	feature_flags {
		definitions %s
	}
}`, globals(storage), defsFile))

	codes, took, errs := putInParallel(n)
	for i := range n {
		if errs[i] != nil || codes[i] != http.StatusOK {
			t.Fatalf("PUT f%d: %d %v", i, codes[i], errs[i])
		}
	}
	slices.Sort(took)
	p50, p99 := took[n/2], took[n*99/100]
	t.Logf("%d parallel PUTs: p50 %v, p99 %v, max %v", n, p50, p99, took[n-1])
	if p99 > 2*time.Second {
		t.Errorf("p99 %v: parallel writers are not combined", p99)
	}

	data, err := os.ReadFile(storedOverridesFile(storage))
	var doc struct {
		Overrides map[string]eval.Override `json:"overrides"`
	}
	if err != nil || json.Unmarshal(data, &doc) != nil {
		t.Fatalf("stored overrides: %s %v", data, err)
	}
	for i := range n {
		if !doc.Overrides[fmt.Sprint("f", i)].Killed {
			t.Fatalf("f%d is not stored killed (%d stored)", i, len(doc.Overrides))
		}
	}
	st := adminStatusOf(t, adminURL)
	if len(st.Overrides) != n {
		t.Errorf("%d overrides in force, want %d", len(st.Overrides), n)
	}
}

// The same through the app's own path, with the interleaving forced: N
// override changes that queue while the storage lock is awaited are stored
// with one write.
func TestConcurrentOverrideChangesAreStoredInOneWrite(t *testing.T) {
	const n = 40
	a := newTestApp(t, manyFlags(n), 0)
	key := a.docs.overrides.Key()
	hold := a.storage.PauseLock(key)
	done := make(chan error, n)
	change := func(i int) {
		_, err := a.setOverride(context.Background(), fmt.Sprint("f", i), &eval.Override{Killed: true}, nil)
		done <- err
	}
	go change(0)
	<-hold.Loaded() // the first writer waits for the lock
	for i := 1; i < n; i++ {
		go change(i)
	}
	eventually(t, 10*time.Second, "every change to queue", func() bool { return a.docs.overrides.Queued() == n })
	hold.Release()
	for range n {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if got := a.storage.StoresOf(key); got != 1 {
		t.Errorf("%d writes of the overrides for %d concurrent changes, want 1", got, n)
	}
	if got := a.engine.snapshot().overrides; len(got) != n {
		t.Errorf("%d overrides in force, want %d", len(got), n)
	}
}

// BenchmarkParallelOverridePuts measures the latency of 200 override PUTs
// sent at once to Caddy's admin API, with file_system storage.
func BenchmarkParallelOverridePuts(b *testing.B) {
	const n = 200
	dir := b.TempDir()
	defsFile := filepath.Join(dir, "flags.json")
	writeFileAtomically(b, defsFile, manyFlags(n))
	storage := filepath.Join(dir, "storage")
	load(b, fmt.Sprintf("{\n%s\n\tfeature_flags {\n\t\tdefinitions %s\n\t}\n}", globals(storage), defsFile))
	b.ResetTimer()
	var worst time.Duration
	for b.Loop() {
		codes, took, errs := putInParallel(n)
		for i := range n {
			if errs[i] != nil || codes[i] != http.StatusOK {
				b.Fatalf("PUT f%d: %d %v", i, codes[i], errs[i])
			}
		}
		worst = max(worst, slices.Max(took))
	}
	b.ReportMetric(float64(worst.Microseconds())/1000, "worst-ms")
}

// holdLockEnv makes the test binary (see TestMain) a process that takes the
// stored overrides' lock in the file_system storage the variable names, and
// holds it until it is killed.
const holdLockEnv = "FLAGSPLIT_TEST_HOLD_OVERRIDES_LOCK"

func holdOverridesLockUntilKilled(storage string) {
	d := storedoc.New[overrideSet](&certmagic.FileStorage{Path: storage}, "feature_flags/local/overrides.json", "overrides", nil)
	_, _, err := d.Update(context.Background(), storedoc.NewReplica[overrideSet](nil), func(overrideSet, uint64) (overrideSet, bool, error) {
		fmt.Println("locked")
		select {} // until SIGKILL
	})
	fmt.Println("update ended:", err)
	os.Exit(1)
}

// Row 5: a process killed (SIGKILL) while it holds the overrides' storage
// lock leaves a fresh lock file, which the file_system storage honours for
// 10 s. The kill switch set after the restart takes effect in well under a
// second: the lock's holder is recognised as gone.
func TestAKillSwitchAfterACrashThatLeftTheStorageLockIsNotDelayed(t *testing.T) {
	storage := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), holdLockEnv+"="+storage)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "locked\n" {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatalf("the lock holder said %q, %v", line, err)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	if locks, _ := filepath.Glob(filepath.Join(storage, "locks", "*.lock")); len(locks) != 1 {
		t.Fatalf("lock files after the kill: %v", locks)
	}

	defsFile := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, defsFile, checkoutDefs(100))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	load(t, fileSite(storage, defsFile, old, nu))
	start := time.Now()
	code, body := adminDo(t, http.MethodPut, adminURL+"/feature_flags/overrides/checkout", `{"killed": true}`)
	took := time.Since(start)
	t.Logf("the first PUT after the crash took %v", took)
	if code != http.StatusOK {
		t.Fatalf("PUT: %d %s", code, body)
	}
	if got := routesTo(t, siteA, 10); got != "old" {
		t.Fatalf("after the kill switch: %s", got)
	}
	if !loggedWith(t, storage, "broke a storage lock its holder left when it crashed", map[string]string{"document": "overrides"}) {
		t.Error("the broken lock was not logged")
	}
	if took > time.Second {
		t.Errorf("the kill switch took %v", took)
	}
}

// Row 12 through Caddy's admin listener: a 10 MB body is answered 413 and a
// body with more than one JSON value 400, and neither sets anything.
func TestOverrideBodiesThroughTheAdminListener(t *testing.T) {
	defsFile := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, defsFile, checkoutDefs(100))
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	load(t, fileSite(t.TempDir(), defsFile, old, nu))
	url := adminURL + "/feature_flags/overrides/checkout"
	// The 10 MB body is announced, not sent: the answer comes before it
	// would be read (a client that sends it all meets a closed connection).
	conn, err := net.Dial("tcp", strings.TrimPrefix(adminURL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "PUT /feature_flags/overrides/checkout HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n",
		strings.TrimPrefix(adminURL, "http://"), 10<<20)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	answer, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(answer), "limit is 65536") {
		t.Errorf("10 MB body: %d %s", resp.StatusCode, answer)
	}
	for _, body := range []string{`{"killed":true} xyz`, `{"killed":true} {"killed":true}`} {
		if code, out := adminDo(t, http.MethodPut, url, body); code != http.StatusBadRequest || !strings.Contains(out, "exactly one JSON value") {
			t.Errorf("%s: %d %s", body, code, out)
		}
	}
	if got := routesTo(t, siteA, 10); got != "new" {
		t.Errorf("after refused bodies: %s", got)
	}
}

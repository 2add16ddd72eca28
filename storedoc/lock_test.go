package storedoc_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/flagsplit/flagsplit/storedoc"
	"github.com/flagsplit/flagsplit/storedoc/storedoctest"
)

// holdEnv makes the test binary a process that takes a document's lock in
// Caddy's file_system storage (the directory the variable names) and holds
// it until it is killed.
const holdEnv = "STOREDOC_HOLD_LOCK_IN"

func TestMain(m *testing.M) {
	if dir := os.Getenv(holdEnv); dir != "" {
		holdLockUntilKilled(dir)
		return
	}
	os.Exit(m.Run())
}

func holdLockUntilKilled(dir string) {
	d := storedoc.New[switches](&certmagic.FileStorage{Path: dir}, "app/switches.json", "switches", nil)
	_, _, err := d.Update(context.Background(), storedoc.NewReplica[switches](nil), func(cur switches, _ uint64) (switches, bool, error) {
		fmt.Println("locked")
		select {} // until SIGKILL
	})
	fmt.Println("update ended:", err)
	os.Exit(1)
}

// staleReports collects a Doc's broken-lock reports.
type staleReports struct {
	mu  sync.Mutex
	got []storedoc.StaleLock
}

func (r *staleReports) add(s storedoc.StaleLock) {
	r.mu.Lock()
	r.got = append(r.got, s)
	r.mu.Unlock()
}

func (r *staleReports) list() []storedoc.StaleLock {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]storedoc.StaleLock(nil), r.got...)
}

// A process killed (SIGKILL) while it holds a document's lock in Caddy's
// file_system storage leaves the lock file, fresh, which that storage would
// honour for 10 s after its last refresh. The next update recognises the
// dead holder and goes on at once.
func TestALockLeftByAKilledProcessIsBrokenAtOnce(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), holdEnv+"="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "locked\n" {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatalf("the holder said %q, %v", line, err)
	}
	holder := cmd.Process.Pid
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait() // reaped, as a service manager would

	locks, _ := filepath.Glob(filepath.Join(dir, "locks", "*.lock"))
	if len(locks) != 1 {
		t.Fatalf("lock files left: %v", locks)
	}
	var meta struct {
		Updated time.Time `json:"updated"`
	}
	data, err := os.ReadFile(locks[0])
	if err != nil || json.Unmarshal(data, &meta) != nil {
		t.Fatalf("lock file %s: %s %v", locks[0], data, err)
	}

	var stale staleReports
	d := storedoc.New[switches](&certmagic.FileStorage{Path: dir}, "app/switches.json", "switches", nil,
		storedoc.WithStaleLockReport(stale.add))
	start := time.Now()
	set(t, d, storedoc.NewReplica[switches](nil), "checkout", false)
	took := time.Since(start)
	t.Logf("update after the holder was killed took %v", took)

	got := stale.list()
	if len(got) != 1 || !strings.Contains(got[0].Owner, fmt.Sprintf("pid %d ", holder)) {
		t.Fatalf("broken locks: %+v (holder pid %d)", got, holder)
	}
	// The storage itself would have waited until 10 s after the lock's
	// last refresh; the update finished well before.
	if took > time.Second || time.Now().After(meta.Updated.Add(10*time.Second)) {
		t.Errorf("the update took %v (the lock was refreshed at %v)", took, meta.Updated)
	}
	if v, _, err := d.Read(context.Background()); err != nil || v.Value.On["checkout"] != false || v.Revision == 0 {
		t.Errorf("stored: %+v %v", v, err)
	}
	if locks, _ := filepath.Glob(filepath.Join(dir, "locks", "*.lock")); len(locks) != 0 {
		t.Errorf("lock files after the update: %v", locks)
	}
}

// An earlier run of this process's PID (a restarted container runs as PID 1
// again) has crashed too: its lock is broken.
func TestALockOfAnEarlierRunOfThisPIDIsBroken(t *testing.T) {
	ctx := context.Background()
	st := storedoctest.NewMemory()
	var stale staleReports
	d := storedoc.New[switches](st, "app/switches.json", "switches", epoch, storedoc.WithStaleLockReport(stale.add))
	if err := st.Lock(ctx, d.Key()); err != nil {
		t.Fatal(err)
	}
	if err := st.Store(ctx, storedoc.OwnerKey(d), storedoc.OwnerRecord(os.Getpid(), "an-earlier-run")); err != nil {
		t.Fatal(err)
	}
	set(t, d, storedoc.NewReplica[switches](nil), "checkout", false)
	if got := stale.list(); len(got) != 1 || !strings.Contains(got[0].Owner, "an-earlier-run") {
		t.Errorf("broken locks: %+v", got)
	}
	if st.Locked(d.Key()) || st.Get(storedoc.OwnerKey(d)) != nil {
		t.Errorf("after the update: locked %v, owner record %s", st.Locked(d.Key()), st.Get(storedoc.OwnerKey(d)))
	}
}

// lockCalls signals each Lock of one name as it starts.
type lockCalls struct {
	*storedoctest.Memory
	name  string
	calls chan struct{}
}

func (s lockCalls) Lock(ctx context.Context, name string) error {
	if name == s.name {
		s.calls <- struct{}{}
	}
	return s.Memory.Lock(ctx, name)
}

// A lock whose holder may be alive (a process that runs, another machine, no
// record at all) is waited for, never broken.
func TestALockWhoseHolderMayBeAliveIsWaitedFor(t *testing.T) {
	running := storedoc.OwnerRecord(os.Getppid(), "parent")
	for name, record := range map[string][]byte{
		"a process that runs": running,
		"another machine":     []byte(strings.Replace(string(running), `"host":"`, `"host":"elsewhere-`, 1)),
		"no record":           nil,
	} {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			mem := storedoctest.NewMemory()
			st := lockCalls{mem, "app/switches.json", make(chan struct{}, 4)}
			var stale staleReports
			d := storedoc.New[switches](st, "app/switches.json", "switches", epoch, storedoc.WithStaleLockReport(stale.add))
			if err := mem.Lock(ctx, d.Key()); err != nil {
				t.Fatal(err)
			}
			if record != nil {
				if err := mem.Store(ctx, storedoc.OwnerKey(d), record); err != nil {
					t.Fatal(err)
				}
			}
			done := make(chan error, 1)
			go func() {
				_, _, err := d.Update(ctx, storedoc.NewReplica[switches](nil), func(cur switches, _ uint64) (switches, bool, error) {
					return cur.with("checkout", false), true, nil
				})
				done <- err
			}()
			<-st.calls // the probe
			<-st.calls // the probe found it held: now the update waits for the lock
			if !mem.Locked(d.Key()) || len(stale.list()) != 0 {
				t.Fatalf("the lock was broken: %+v", stale.list())
			}
			if err := mem.Unlock(ctx, d.Key()); err != nil {
				t.Fatal(err)
			}
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if v, _, err := d.Read(ctx); err != nil || v.Revision != 1 {
				t.Errorf("update after the holder released the lock: %+v %v", v, err)
			}
		})
	}
}

package storedoc_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/flagsplit/flagsplit/storedoc"
	"github.com/flagsplit/flagsplit/storedoc/storedoctest"
)

// damages are the ways a stored copy is found damaged.
var damages = map[string]func(good []byte) []byte{
	"truncated":    func(good []byte) []byte { return good[:len(good)/2] },
	"empty":        func([]byte) []byte { return nil },
	"random bytes": func([]byte) []byte { return []byte{0x9f, 0x00, 0x13, 0xfe, 0x7b, 0x22, 0xff} },
	"wrong shape":  func([]byte) []byte { return []byte(`[]`) },
	"null":         func([]byte) []byte { return []byte(`null`) },
	"another kind": func([]byte) []byte { return []byte(`{"format": 1, "kind": "rollouts", "revision": 99}`) },
	"bad field":    func([]byte) []byte { return []byte(`{"format": 1, "kind": "switches", "revision": 99, "on": []}`) },
}

// reports collects a Doc's damage reports.
type reports struct {
	mu  sync.Mutex
	got []storedoc.Damage
}

func (r *reports) add(d storedoc.Damage) {
	r.mu.Lock()
	r.got = append(r.got, d)
	r.mu.Unlock()
}

func (r *reports) list() []storedoc.Damage {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]storedoc.Damage(nil), r.got...)
}

func reportedDoc(st storedoc.Storage, r *reports) *storedoc.Doc[switches] {
	return storedoc.New[switches](st, "app/switches.json", "switches", epoch, storedoc.WithDamageReport(r.add))
}

// A damaged copy (whatever the damage) falls back to the backup, which holds
// the last write: a restarted instance (nothing in force) still has the kill
// switch. The damage is reported once, and an update over it works, keeps
// the damaged bytes aside and builds on the backup.
func TestADamagedDocumentFallsBackToItsBackup(t *testing.T) {
	for name, damage := range damages {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			st := storedoctest.NewMemory()
			set(t, newDoc(st), storedoc.NewReplica[switches](nil), "other", true)
			written := set(t, newDoc(st), storedoc.NewReplica[switches](nil), "checkout", false)
			bad := damage(st.Get("app/switches.json"))
			if err := st.Store(ctx, "app/switches.json", bad); err != nil {
				t.Fatal(err)
			}

			var r reports
			d := reportedDoc(st, &r)
			h := storedoc.NewReplica[switches](nil) // a restart: nothing in force
			applied, err := d.Sync(ctx, h)
			if err != nil || !applied {
				t.Fatalf("sync: applied %v, %v", applied, err)
			}
			if cur, _ := h.Current(); cur.Revision != written.Revision || cur.Value.On["checkout"] || !cur.Value.On["other"] {
				t.Errorf("in force after the sync: %+v, want revision %d", cur, written.Revision)
			}
			got := r.list()
			if len(got) != 1 || got[0].Key != "app/switches.json" || got[0].Recovered != "backup" ||
				got[0].Revision != written.Revision || !errors.Is(got[0].Err, storedoc.ErrUnreadable) {
				t.Fatalf("reports: %+v", got)
			}
			if _, err := d.Sync(ctx, h); err != nil || len(r.list()) != 1 {
				t.Errorf("the same damage again: %v, %d reports", err, len(r.list()))
			}
			if v, found, err := d.Read(ctx); err != nil || !found || v.Revision != written.Revision {
				t.Errorf("read: %+v %v %v", v, found, err)
			}

			// A fresh holder's update builds on the backup, not on nothing.
			v := set(t, d, storedoc.NewReplica[switches](nil), "hero", true)
			if !v.Value.On["other"] || v.Value.On["checkout"] || !v.Value.On["hero"] || v.Revision != written.Revision+1 {
				t.Errorf("update over the damage: %+v", v)
			}
			if string(st.Get("app/switches.json.unreadable")) != string(bad) {
				t.Errorf("kept aside: %q, want %q", st.Get("app/switches.json.unreadable"), bad)
			}
			for _, key := range []string{"app/switches.json", "app/switches.json.backup"} {
				got, _, err := newDoc(copyOf(st, key)).Read(ctx)
				if err != nil || got.Revision != v.Revision {
					t.Errorf("%s after the update: %+v %v", key, got, err)
				}
			}
		})
	}
}

// copyOf is a storage holding st's copy under key as the document itself.
func copyOf(st *storedoctest.Memory, key string) *storedoctest.Memory {
	out := storedoctest.NewMemory()
	_ = out.Store(context.Background(), "app/switches.json", st.Get(key))
	return out
}

// With both copies damaged, a sync keeps what is in force, and an update
// builds on it; without anything in force the update starts afresh. Neither
// fails.
func TestAnUpdateOverTwoDamagedCopiesBuildsOnWhatIsInForce(t *testing.T) {
	ctx := context.Background()
	st := storedoctest.NewMemory()
	h := storedoc.NewReplica[switches](nil)
	written := set(t, newDoc(st), h, "checkout", false)
	for _, key := range []string{"app/switches.json", "app/switches.json.backup"} {
		if err := st.Store(ctx, key, []byte("{")); err != nil {
			t.Fatal(err)
		}
	}
	var r reports
	d := reportedDoc(st, &r)
	if applied, err := d.Sync(ctx, h); applied || err != nil {
		t.Fatalf("sync: %v %v", applied, err)
	}
	if cur, _ := h.Current(); cur.Revision != written.Revision {
		t.Fatalf("the version in force changed: %+v", cur)
	}
	if got := r.list(); len(got) != 1 || got[0].Recovered != "" {
		t.Fatalf("reports after the sync: %+v", got)
	}
	if _, found, err := d.Read(ctx); found || !errors.Is(err, storedoc.ErrUnreadable) {
		t.Errorf("read of two damaged copies: %v %v", found, err)
	}
	// Damaged anew (other bytes, so reported anew) and updated.
	if err := st.Store(ctx, "app/switches.json", []byte("{{")); err != nil {
		t.Fatal(err)
	}
	v := set(t, d, h, "hero", true)
	if v.Value.On["checkout"] || !v.Value.On["hero"] || v.Revision != written.Revision+1 {
		t.Errorf("update: %+v", v)
	}
	// The update reports the damage it replaced, with what it built on.
	if got := r.list(); len(got) != 2 || got[1].Recovered != "in force" || got[1].KeptAside != "app/switches.json.unreadable" {
		t.Errorf("reports after the update: %+v", got)
	}
}

// tornStores cuts the write of one key short: half the bytes land, and the
// write fails, as when the process dies or the disk fills mid-write.
type tornStores struct {
	*storedoctest.Memory
	key string
}

func (s tornStores) Store(ctx context.Context, key string, value []byte) error {
	if key == s.key {
		_ = s.Memory.Store(ctx, key, value[:len(value)/2])
		return fmt.Errorf("writing %s: no space left on device", key)
	}
	return s.Memory.Store(ctx, key, value)
}

// A write cut short, of either copy, leaves a good one: the previous version
// when the first copy was torn, the new one when the backup was.
func TestAWriteCutShortLeavesAGoodCopy(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		torn     string
		wantErr  bool
		wantHero bool
	}{
		{torn: "app/switches.json", wantErr: true, wantHero: false},
		{torn: "app/switches.json.backup", wantErr: false, wantHero: true},
	} {
		t.Run(c.torn, func(t *testing.T) {
			st := storedoctest.NewMemory()
			set(t, newDoc(st), storedoc.NewReplica[switches](nil), "checkout", false)
			_, _, err := newDoc(tornStores{st, c.torn}).Update(ctx, storedoc.NewReplica[switches](nil), func(cur switches, _ uint64) (switches, bool, error) {
				return cur.with("hero", true), true, nil
			})
			if (err != nil) != c.wantErr {
				t.Fatalf("update: %v", err)
			}
			var r reports
			v, found, err := reportedDoc(st, &r).Read(ctx)
			if err != nil || !found || v.Value.On["checkout"] || v.Value.On["hero"] != c.wantHero {
				t.Errorf("read after the torn write: %+v %v %v", v, found, err)
			}
		})
	}
}

// Without a damage report, damage is the caller's error, as before.
func TestWithoutAReportDamageIsAnError(t *testing.T) {
	ctx := context.Background()
	st := storedoctest.NewMemory()
	set(t, newDoc(st), storedoc.NewReplica[switches](nil), "checkout", false)
	_ = st.Store(ctx, "app/switches.json", []byte("null"))
	d := newDoc(st)
	h := storedoc.NewReplica[switches](nil)
	if applied, err := d.Sync(ctx, h); !applied || !errors.Is(err, storedoc.ErrUnreadable) || !strings.Contains(err.Error(), "not a JSON object") {
		t.Errorf("sync: %v %v", applied, err)
	}
	if _, err := d.Sync(ctx, h); err != nil {
		t.Errorf("second sync of the same damage: %v", err)
	}
}

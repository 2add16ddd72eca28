package storedoc_test

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flagsplit/flagsplit/storedoc"
	"github.com/flagsplit/flagsplit/storedoc/storedoctest"
)

// switches is a document in the shape of the overrides document: one object
// field holding a map.
type switches struct {
	On map[string]bool `json:"on"`
}

func (s switches) with(key string, on bool) switches {
	m := maps.Clone(s.On)
	if m == nil {
		m = map[string]bool{}
	}
	m[key] = on
	return switches{On: m}
}

// epoch is the fixed clock of these tests: revisions grow by one (the clock
// floor of 1 ms is far below them).
func epoch() time.Time { return time.Unix(0, 0).Add(time.Millisecond) }

func newDoc(st storedoc.Storage) *storedoc.Doc[switches] {
	return storedoc.New[switches](st, "app/switches.json", "switches", epoch)
}

func set(t *testing.T, d *storedoc.Doc[switches], h storedoc.Holder[switches], key string, on bool) storedoc.Version[switches] {
	t.Helper()
	v, changed, err := d.Update(context.Background(), h, func(cur switches, _ uint64) (switches, bool, error) {
		return cur.with(key, on), true, nil
	})
	if err != nil || !changed {
		t.Fatalf("update %s=%v: changed %v, %v", key, on, changed, err)
	}
	return v
}

func TestUpdateWritesAnEnvelopeBesideTheDocumentsFields(t *testing.T) {
	st := storedoctest.NewMemory()
	d := newDoc(st)
	h := storedoc.NewReplica[switches](nil)
	v := set(t, d, h, "checkout", true)
	if v.Revision != 1 {
		t.Errorf("first revision %d, want 1", v.Revision)
	}
	var raw map[string]any
	if err := json.Unmarshal(st.Get("app/switches.json"), &raw); err != nil {
		t.Fatal(err)
	}
	if raw["format"] != 1.0 || raw["kind"] != "switches" || raw["revision"] != 1.0 || raw["updated_at"] == nil ||
		raw["on"].(map[string]any)["checkout"] != true {
		t.Errorf("stored %v", raw)
	}
	got, found, err := d.Read(context.Background())
	if err != nil || !found || got.Revision != 1 || !got.Value.On["checkout"] {
		t.Errorf("read back %+v %v %v", got, found, err)
	}
}

func TestADocumentWithoutEnvelopeIsRevisionZero(t *testing.T) {
	st := storedoctest.NewMemory()
	// What releases before revisions wrote: the same object, no envelope.
	if err := st.Store(context.Background(), "app/switches.json", []byte(`{"updated_at": "2026-01-01T00:00:00Z", "on": {"old": true}}`)); err != nil {
		t.Fatal(err)
	}
	d := newDoc(st)
	h := storedoc.NewReplica[switches](nil)
	if applied, err := d.Sync(context.Background(), h); err != nil || !applied || !h.Value().On["old"] {
		t.Fatalf("sync of a document without envelope: %v %v %+v", applied, err, h.Value())
	}
	if cur, _ := h.Current(); cur.Revision != 0 {
		t.Errorf("revision %d, want 0", cur.Revision)
	}
	v := set(t, d, h, "new", true)
	if v.Revision != 1 || !v.Value.On["old"] || !v.Value.On["new"] {
		t.Errorf("update of an old document: %+v", v)
	}
}

// The interleaving that made a kill switch flip back: a sync reads the stored
// document, an update writes a newer one and puts it in force, then the sync
// goes on with what it read. The older version must not come back.
func TestAStaleReadNeverReplacesANewerVersion(t *testing.T) {
	st := storedoctest.NewMemory()
	d := newDoc(st)
	here := storedoc.NewReplica[switches](nil)
	elsewhere := storedoc.NewReplica[switches](nil)
	set(t, d, elsewhere, "checkout", false) // revision 1, from another instance

	pause := st.PauseLoad(d.Key())
	synced := make(chan error, 1)
	go func() {
		_, err := d.Sync(context.Background(), here)
		synced <- err
	}()
	<-pause.Loaded() // the sync holds revision 1's bytes
	newer := set(t, d, here, "checkout", true)
	if newer.Revision != 2 || !here.Value().On["checkout"] {
		t.Fatalf("the update is not in force: %+v", here.Value())
	}
	pause.Release()
	if err := <-synced; err != nil {
		t.Fatal(err)
	}
	if cur, _ := here.Current(); cur.Revision != 2 || !cur.Value.On["checkout"] {
		t.Errorf("after the stale sync: revision %d, %+v; the newer version flipped back", cur.Revision, cur.Value)
	}
}

func TestConcurrentUpdatesFromSeveralInstancesLoseNothing(t *testing.T) {
	st := storedoctest.NewMemory()
	const instances, each = 4, 25
	var wg sync.WaitGroup
	holders := make([]*storedoc.Replica[switches], instances)
	for i := range holders {
		holders[i] = storedoc.NewReplica[switches](nil)
		d := newDoc(st) // every instance has its own Doc over the shared storage
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for j := 0; j < each; j++ {
				set(t, d, holders[i], string(rune('a'+i))+"-"+string(rune('a'+j)), true)
			}
		}(i)
	}
	wg.Wait()
	final, _, err := newDoc(st).Read(context.Background())
	if err != nil || len(final.Value.On) != instances*each || final.Revision != instances*each {
		t.Fatalf("after %d updates: %d keys at revision %d (%v)", instances*each, len(final.Value.On), final.Revision, err)
	}
	for i, h := range holders {
		if _, err := newDoc(st).Sync(context.Background(), h); err != nil {
			t.Fatal(err)
		}
		if cur, _ := h.Current(); cur.Revision != final.Revision {
			t.Errorf("instance %d is at revision %d after a sync, want %d", i, cur.Revision, final.Revision)
		}
	}
}

func TestAnUnreadableDocumentIsKeptAsideAndReportedOnce(t *testing.T) {
	st := storedoctest.NewMemory()
	ctx := context.Background()
	broken := []byte(`{"on": {"checkout": tru`)
	if err := st.Store(ctx, "app/switches.json", broken); err != nil {
		t.Fatal(err)
	}
	d := newDoc(st)
	h := storedoc.NewReplica[switches](nil)
	if _, err := d.Sync(ctx, h); !errors.Is(err, storedoc.ErrUnreadable) {
		t.Fatalf("first sync: %v, want ErrUnreadable", err)
	}
	if _, err := d.Sync(ctx, h); err != nil {
		t.Errorf("the same unreadable bytes were reported again: %v", err)
	}
	set(t, d, h, "checkout", true)
	if got := string(st.Get("app/switches.json.unreadable")); got != string(broken) {
		t.Errorf("kept aside: %q", got)
	}
	if v, _, err := d.Read(ctx); err != nil || !v.Value.On["checkout"] {
		t.Errorf("after the replacement: %+v %v", v, err)
	}
	// A document of another kind is unreadable too.
	other := storedoc.New[switches](st, "app/switches.json", "rollouts", epoch)
	if _, _, err := other.Read(ctx); !errors.Is(err, storedoc.ErrUnreadable) || !strings.Contains(err.Error(), `"switches"`) {
		t.Errorf("reading another kind: %v", err)
	}
}

func TestANewerFormatIsNeitherUsedNorOverwritten(t *testing.T) {
	st := storedoctest.NewMemory()
	ctx := context.Background()
	future := []byte(`{"format": 2, "kind": "switches", "revision": 9, "on": {"checkout": true}}`)
	if err := st.Store(ctx, "app/switches.json", future); err != nil {
		t.Fatal(err)
	}
	d := newDoc(st)
	h := storedoc.NewReplica[switches](nil)
	if applied, err := d.Sync(ctx, h); applied || !errors.Is(err, storedoc.ErrNewerFormat) {
		t.Errorf("sync: %v %v", applied, err)
	}
	_, _, err := d.Update(ctx, h, func(cur switches, _ uint64) (switches, bool, error) { return cur.with("x", true), true, nil })
	if !errors.Is(err, storedoc.ErrNewerFormat) || string(st.Get("app/switches.json")) != string(future) {
		t.Errorf("update over a newer format: %v; stored %s", err, st.Get("app/switches.json"))
	}
}

// When the storage lost the document, the version in force here is the better
// record: the update builds on it, and its revision outranks the lost ones.
func TestAnUpdateAfterTheStorageLostTheDocumentBuildsOnWhatIsInForce(t *testing.T) {
	ctx := context.Background()
	first := storedoctest.NewMemory()
	h := storedoc.NewReplica[switches](nil)
	d := newDoc(first)
	set(t, d, h, "a", true)
	set(t, d, h, "b", true)
	// The same holder over an empty storage (say, a wiped volume).
	lost := newDoc(storedoctest.NewMemory())
	v := set(t, lost, h, "c", true)
	if v.Revision != 3 || !v.Value.On["a"] || !v.Value.On["b"] || !v.Value.On["c"] {
		t.Errorf("after the loss: %+v", v)
	}
	// With a real clock the revision is at least the time in milliseconds,
	// so that a document recreated from nothing outranks older ones.
	clocked := storedoc.New[switches](storedoctest.NewMemory(), "k", "switches", func() time.Time { return time.UnixMilli(5_000) })
	v, _, err := clocked.Update(ctx, storedoc.NewReplica[switches](nil), func(switches, uint64) (switches, bool, error) {
		return switches{On: map[string]bool{"x": true}}, true, nil
	})
	if err != nil || v.Revision != 5_000 {
		t.Errorf("clock floor: revision %d, %v", v.Revision, err)
	}
}

func TestAnUnchangedUpdateWritesNothing(t *testing.T) {
	st := storedoctest.NewMemory()
	d := newDoc(st)
	h := storedoc.NewReplica[switches](nil)
	set(t, d, h, "a", true)
	writes := st.StoresOf(d.Key())
	v, changed, err := d.Update(context.Background(), h, func(cur switches, _ uint64) (switches, bool, error) { return cur, false, nil })
	if err != nil || changed || v.Revision != 1 || st.StoresOf(d.Key()) != writes {
		t.Errorf("unchanged update: %+v %v %v, %d writes", v, changed, err, st.StoresOf(d.Key())-writes)
	}
	refused := errors.New("refused")
	if _, _, err := d.Update(context.Background(), h, func(cur switches, _ uint64) (switches, bool, error) { return cur, true, refused }); !errors.Is(err, refused) || st.StoresOf(d.Key()) != writes {
		t.Errorf("a refused change: %v, %d writes", err, st.StoresOf(d.Key())-writes)
	}
}

func TestReplicaCallsOnChangeOnlyForNewerVersions(t *testing.T) {
	calls := 0
	r := storedoc.NewReplica[int](func() { calls++ })
	for _, c := range []struct {
		rev  uint64
		want bool
	}{{0, true}, {0, false}, {3, true}, {2, false}, {3, false}, {4, true}} {
		if got := r.Offer(storedoc.Version[int]{Revision: c.rev, Value: int(c.rev)}); got != c.want {
			t.Errorf("offer of revision %d: %v, want %v", c.rev, got, c.want)
		}
	}
	if calls != 3 || r.Value() != 4 {
		t.Errorf("%d calls, value %d", calls, r.Value())
	}
}

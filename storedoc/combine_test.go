package storedoc_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/flagsplit/flagsplit/storedoc"
	"github.com/flagsplit/flagsplit/storedoc/storedoctest"
)

// N updates that arrive while the lock is awaited share one lock and one
// write; each caller gets its own result, and a change that fails fails
// only its own caller.
func TestConcurrentUpdatesShareOneLockAndOneWrite(t *testing.T) {
	const n = 50
	st := storedoctest.NewMemory()
	d := newDoc(st)
	h := storedoc.NewReplica[switches](nil)
	set(t, d, h, "base", true)
	queued := make(chan struct{}, n)
	storedoc.OnQueued(d, func() { queued <- struct{}{} })
	hold := st.PauseLock(d.Key())
	writes := st.StoresOf(d.Key())
	refused := errors.New("refused")

	type result struct {
		i       int
		v       storedoc.Version[switches]
		changed bool
		err     error
	}
	results := make(chan result, n)
	update := func(i int) {
		v, changed, err := d.Update(context.Background(), h, func(cur switches, _ uint64) (switches, bool, error) {
			switch i % 10 {
			case 3:
				return cur, false, refused
			case 7:
				return cur, false, nil
			}
			return cur.with(fmt.Sprint("k", i), true), true, nil
		})
		results <- result{i, v, changed, err}
	}
	go update(0)
	<-hold.Loaded() // the first caller leads and waits for the lock
	for i := 1; i < n; i++ {
		go update(i)
	}
	for range n {
		<-queued // every caller has queued its change
	}
	hold.Release()

	var rev uint64
	for range n {
		r := <-results
		switch r.i % 10 {
		case 3:
			if !errors.Is(r.err, refused) || r.changed {
				t.Errorf("caller %d: %v %v, want its own refusal", r.i, r.changed, r.err)
			}
		case 7:
			if r.err != nil || r.changed {
				t.Errorf("caller %d: %v %v, want unchanged", r.i, r.changed, r.err)
			}
		default:
			if r.err != nil || !r.changed || !r.v.Value.On[fmt.Sprint("k", r.i)] {
				t.Errorf("caller %d: %+v %v %v", r.i, r.v, r.changed, r.err)
			}
			if rev != 0 && r.v.Revision != rev {
				t.Errorf("caller %d got revision %d, others %d", r.i, r.v.Revision, rev)
			}
			rev = r.v.Revision
		}
	}
	if got := st.StoresOf(d.Key()) - writes; got != 1 {
		t.Errorf("%d writes of the document for %d concurrent updates, want 1", got, n)
	}
	final, _, err := newDoc(st).Read(context.Background())
	if err != nil || len(final.Value.On) != 1+n-2*n/10 || final.Revision != rev {
		t.Errorf("stored: %d keys at revision %d (%v)", len(final.Value.On), final.Revision, err)
	}
	if cur, _ := h.Current(); cur.Revision != rev {
		t.Errorf("in force: revision %d, want %d", cur.Revision, rev)
	}
}

// A failed write fails every caller of the round, even one whose change
// changed nothing: what it saw is not stored.
func TestAFailedWriteFailsTheWholeRound(t *testing.T) {
	st := storedoctest.NewMemory()
	good := newDoc(st)
	h := storedoc.NewReplica[switches](nil)
	set(t, good, h, "base", true)
	d := newDoc(failingStore{st, good.Key()})
	queued := make(chan struct{}, 2)
	storedoc.OnQueued(d, func() { queued <- struct{}{} })
	hold := st.PauseLock(d.Key())
	errs := make(chan error, 2)
	go func() {
		_, _, err := d.Update(context.Background(), h, func(cur switches, _ uint64) (switches, bool, error) {
			return cur.with("a", true), true, nil
		})
		errs <- err
	}()
	<-hold.Loaded()
	go func() {
		_, _, err := d.Update(context.Background(), h, func(cur switches, _ uint64) (switches, bool, error) {
			return cur, !cur.On["a"], nil // "already set": unchanged, on a state never stored
		})
		errs <- err
	}()
	<-queued
	<-queued
	hold.Release()
	for range 2 {
		if err := <-errs; err == nil {
			t.Error("a caller of a round whose write failed got no error")
		}
	}
	if h.Value().On["a"] {
		t.Error("a change that was not stored is in force")
	}
}

type failingStore struct {
	*storedoctest.Memory
	key string
}

func (s failingStore) Store(ctx context.Context, key string, value []byte) error {
	if key == s.key {
		return errors.New("disk full")
	}
	return s.Memory.Store(ctx, key, value)
}

// A caller whose context ends while it waits in the queue leaves it: its
// change is never made, and the others' go on.
func TestAQueuedUpdateWhoseContextEndsIsNeverMade(t *testing.T) {
	st := storedoctest.NewMemory()
	d := newDoc(st)
	h := storedoc.NewReplica[switches](nil)
	queued := make(chan struct{}, 3)
	storedoc.OnQueued(d, func() { queued <- struct{}{} })
	hold := st.PauseLock(d.Key())
	done := make(chan error, 3)
	up := func(ctx context.Context, key string) {
		_, _, err := d.Update(ctx, h, func(cur switches, _ uint64) (switches, bool, error) {
			return cur.with(key, true), true, nil
		})
		done <- err
	}
	go up(context.Background(), "leader")
	<-hold.Loaded()
	<-queued
	ctx, cancel := context.WithCancel(context.Background())
	go up(ctx, "gone")
	<-queued
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("the cancelled caller: %v", err)
	}
	go up(context.Background(), "after")
	<-queued
	hold.Release()
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if v := h.Value(); !v.On["leader"] || !v.On["after"] || v.On["gone"] {
		t.Errorf("in force: %+v", v)
	}
}

// A change that panics fails its round and panics its leader's caller, and
// the callers after it still get a leader.
func TestAPanickingChangeLeavesTheQueueUsable(t *testing.T) {
	st := storedoctest.NewMemory()
	d := newDoc(st)
	h := storedoc.NewReplica[switches](nil)
	queued := make(chan struct{}, 4)
	storedoc.OnQueued(d, func() { queued <- struct{}{} })
	hold := st.PauseLock(d.Key())
	panicked := make(chan any, 1)
	go func() {
		defer func() { panicked <- recover() }()
		_, _, _ = d.Update(context.Background(), h, func(switches, uint64) (switches, bool, error) { panic("boom") })
	}()
	<-hold.Loaded()
	<-queued
	hold.Release()
	if p := <-panicked; p != "boom" {
		t.Fatalf("the leader's caller: %v", p)
	}
	v := set(t, d, h, "after", true)
	if !v.Value.On["after"] || st.Locked(d.Key()) {
		t.Errorf("after the panic: %+v, locked %v", v, st.Locked(d.Key()))
	}
}

package storedoc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"
)

// LockProbe is how long an update tries the storage lock before it looks at
// who holds it. It bounds the delay a lock left by a crashed process on this
// machine causes: such a lock is broken once the probe has found it held.
const LockProbe = 50 * time.Millisecond

// unlockTimeout bounds the release of the storage lock (which goes on after
// the caller's context ended: a lock left behind blocks every instance).
const unlockTimeout = 10 * time.Second

// ownerSuffix is the key of the record a lock holder leaves while it holds
// the document's lock.
const ownerSuffix = ".lock-owner"

// lockOwner is the record of who holds a document's storage lock. It is
// written after the lock is taken and deleted before it is released, so a
// record found while the lock is held names its holder.
type lockOwner struct {
	// Host is the host name and PID namespace of the holder's machine:
	// process IDs compare only within one.
	Host string `json:"host"`
	PID  int    `json:"pid"`
	// Run tells runs of one process ID apart (a container restarted
	// runs as the same PID).
	Run   string    `json:"run"`
	Since time.Time `json:"since"`
}

func (o lockOwner) String() string {
	return fmt.Sprintf("pid %d on %s (run %s, since %s)", o.PID, o.Host, o.Run, o.Since.Format(time.RFC3339Nano))
}

// self is this process as a lock owner.
var self = sync.OnceValue(func() lockOwner {
	host, _ := os.Hostname()
	if ns, err := os.Readlink("/proc/self/ns/pid"); err == nil {
		host += " " + ns
	}
	run := make([]byte, 8)
	_, _ = rand.Read(run)
	return lockOwner{Host: host, PID: os.Getpid(), Run: hex.EncodeToString(run)}
})

// crashed reports whether the process o names has certainly ended: a process
// of this machine that is gone, or an earlier run of this process's PID.
// Anything else (another machine, a process that runs) may still hold the
// lock.
func crashed(o lockOwner) bool {
	me := self()
	if o.Host == "" || o.Host != me.Host || o.PID <= 0 {
		return false
	}
	if o.PID == me.PID {
		return o.Run != me.Run
	}
	return !processRuns(o.PID)
}

// lock takes the document's storage lock; see Update.
func (d *Doc[T]) lock(ctx context.Context) error {
	err := d.tryLock(ctx)
	if err == nil {
		d.claim(ctx)
		return nil
	}
	if !errors.Is(err, errHeld) {
		return err
	}
	locked, err := d.breakCrashed(ctx)
	if err != nil || locked {
		return err
	}
	if err := d.storage.Lock(ctx, d.key); err != nil {
		return fmt.Errorf("locking %s in storage: %w", d.key, err)
	}
	d.claim(ctx)
	return nil
}

// errHeld: the lock was held throughout the probe.
var errHeld = errors.New("lock held")

// tryLock tries the lock for LockProbe; errHeld when it stayed held.
func (d *Doc[T]) tryLock(ctx context.Context) error {
	return tryLock(ctx, d.storage, d.key)
}

func tryLock(ctx context.Context, st Storage, name string) error {
	probe, cancel := context.WithTimeout(ctx, LockProbe)
	defer cancel()
	err := st.Lock(probe, name)
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return fmt.Errorf("locking %s in storage: %w", name, ctx.Err())
	case probe.Err() != nil:
		return errHeld
	}
	return fmt.Errorf("locking %s in storage: %w", name, err)
}

// claim records this process as the lock's holder. It is best effort: without
// the record, a crash while holding the lock is only waited out.
func (d *Doc[T]) claim(ctx context.Context) {
	o := self()
	o.Since = time.Now().UTC()
	data, err := json.Marshal(o)
	if err == nil {
		_ = d.storage.Store(ctx, d.key+ownerSuffix, data)
	}
}

// unlock deletes the holder's record and releases the lock.
func (d *Doc[T]) unlock(ctx context.Context) {
	_ = d.storage.Delete(ctx, d.key+ownerSuffix)
	_ = d.storage.Unlock(ctx, d.key)
}

// breakCrashed breaks the lock when its holder's record names a process that
// has crashed, and takes it; locked says whether it did. Breakers serialise
// on a second lock, and look at the record again under it, so that two of
// them never both break the lock (the second would break the first's).
func (d *Doc[T]) breakCrashed(ctx context.Context) (locked bool, err error) {
	o, ok := d.owner(ctx)
	if !ok || !crashed(o) {
		return false, nil
	}
	guard := d.key + ".break"
	if err := tryLock(ctx, d.storage, guard); err != nil {
		// Another breaker is at it (or the guard itself was left by a
		// crash): wait for the lock as usual.
		return false, nil
	}
	defer func() {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), unlockTimeout)
		defer cancel()
		_ = d.storage.Unlock(uctx, guard)
	}()
	if o, ok = d.owner(ctx); !ok || !crashed(o) {
		return false, nil
	}
	if err := d.storage.Unlock(ctx, d.key); err != nil {
		return false, nil
	}
	if err := tryLock(ctx, d.storage, d.key); err != nil {
		// Someone who was waiting took it first: that holder is alive.
		return false, nil
	}
	d.claim(ctx)
	if d.opts.stale != nil {
		d.opts.stale(StaleLock{Name: d.key, Owner: o.String()})
	}
	return true, nil
}

// owner reads the lock holder's record.
func (d *Doc[T]) owner(ctx context.Context) (lockOwner, bool) {
	var o lockOwner
	data, err := d.storage.Load(ctx, d.key+ownerSuffix)
	if err != nil || json.Unmarshal(data, &o) != nil {
		return o, false
	}
	return o, true
}

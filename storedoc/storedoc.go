// Package storedoc keeps small JSON documents in a storage that several
// instances share (Caddy's storage: the file system, Redis, Consul, S3 ...)
// and in force on each instance, under one protocol:
//
//   - Every document carries a revision that grows with every write, so
//     instances order versions by revision, not by their clocks or by storage
//     modification times.
//
//   - Every write is a read-modify-write under the storage's lock
//     ([Doc.Update]), so no instance overwrites a change it has not seen.
//
//   - A version read or written is put in force only when it is newer than the
//     version in force ([Holder.Offer]), so a read that was slow, or that
//     raced with a write, can never undo a newer change.
//
//   - Every write stores the document twice, under its key and then under
//     key+".backup", so that a damaged copy (truncated, emptied, overwritten
//     with something that is not the document) never loses the document: a
//     read falls back to the other copy, or to the version in force, and
//     reports the damage ([WithDamageReport]).
//
//   - Concurrent updates of one Doc are combined: they queue, and one of the
//     callers takes the storage lock once, applies every queued change in
//     order and writes once ([Doc.Update]).
//
//   - A storage lock left behind by a process that crashed on this machine
//     is recognised and broken at once, rather than waited out (see
//     [Doc.Update]).
//
// Reads and writes both end in [Holder.Offer]: there is no second way for a
// version to come into force.
package storedoc

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"time"
)

// Storage is the part of Caddy's storage (certmagic.Storage) that documents
// use. Load must report a missing key with an error matching fs.ErrNotExist,
// as certmagic requires of every storage. Lock must give up when its context
// ends.
type Storage interface {
	Lock(ctx context.Context, name string) error
	Unlock(ctx context.Context, name string) error
	Store(ctx context.Context, key string, value []byte) error
	Load(ctx context.Context, key string) ([]byte, error)
	Delete(ctx context.Context, key string) error
}

// Version is a document's value at one revision.
type Version[T any] struct {
	// Revision orders versions: a larger revision is newer. 0 is a document
	// written before documents carried revisions.
	Revision  uint64
	UpdatedAt time.Time
	Value     T
}

// Holder is what one instance has in force of a document.
type Holder[T any] interface {
	// Current returns the version in force; ok is false before any.
	Current() (v Version[T], ok bool)
	// Offer is given every version read from or written to storage. It puts
	// the version in force if it is newer than the one in force, and reports
	// whether it did. The check and the change must be one atomic step.
	Offer(v Version[T]) bool
}

// Errors reading a stored document.
var (
	// ErrUnreadable: the stored document is not a document of this kind.
	ErrUnreadable = errors.New("stored document is unreadable")
	// ErrNewerFormat: a newer release wrote the document; it is neither
	// used nor overwritten.
	ErrNewerFormat = errors.New("stored document was written in a newer format")
)

// format is the envelope version this package writes.
const format = 1

// header is the envelope: fields stored beside the document's own, so that a
// document written with an envelope is still the object that releases
// without one wrote and read (their readers ignore the extra fields).
type header struct {
	Format    int       `json:"format"`
	Kind      string    `json:"kind"`
	Revision  uint64    `json:"revision"`
	UpdatedAt time.Time `json:"updated_at"`
}

// Suffixes of the keys a document keeps beside its own.
const (
	// backupSuffix: the second copy of the document, written after every
	// write of the first.
	backupSuffix = ".backup"
	// unreadableSuffix: the damaged bytes an update replaced.
	unreadableSuffix = ".unreadable"
)

// Damage reports a stored copy of a document that is not a document of its
// kind: truncated, empty, random bytes, another shape, JSON null.
type Damage struct {
	// Key is the damaged copy's key.
	Key string
	// Err says what is wrong with it (it matches ErrUnreadable).
	Err error
	// Recovered says where the version used instead came from: "backup"
	// (the other copy), "in force" (what this instance had in force; only
	// for an update), or "" when there was nothing to fall back on.
	Recovered string
	// Revision is the revision of the version used instead.
	Revision uint64
	// KeptAside is the key the damaged bytes were copied to before an
	// update replaced them ("" when they were not replaced).
	KeptAside string
}

// StaleLock reports a storage lock that a crashed process left behind and
// that was broken.
type StaleLock struct {
	// Name is the lock's name (the document's key).
	Name string
	// Owner describes the process that held it.
	Owner string
}

// Option configures a Doc.
type Option func(*options)

type options struct {
	damaged func(Damage)
	stale   func(StaleLock)
}

// WithDamageReport has f told of every damaged copy, once per damaged
// content: a damaged document that stays as it is is not reported again by
// later reads. Without it, damage is returned as an error matching
// ErrUnreadable (by Sync once per content).
func WithDamageReport(f func(Damage)) Option { return func(o *options) { o.damaged = f } }

// WithStaleLockReport has f told of every storage lock of the document that
// was broken because its holder had crashed.
func WithStaleLockReport(f func(StaleLock)) Option { return func(o *options) { o.stale = f } }

// Doc is one document in storage. T must marshal to a JSON object whose
// fields do not use the envelope's names (format, kind, revision,
// updated_at). Use it by pointer; it is safe for concurrent use.
type Doc[T any] struct {
	storage Storage
	key     string
	kind    string
	now     func() time.Time
	opts    options

	mu       sync.Mutex
	reported [sha256.Size]byte // the damaged content last reported
	// queue holds the updates waiting for the leader; leading says whether
	// some caller is the leader (see Update).
	queue   []*update[T]
	leading bool
	// queued, when set (by tests), is called after each update is queued.
	queued func()
}

// New returns the document kind stored under key. now is the clock that
// stamps writes (nil: time.Now).
func New[T any](storage Storage, key, kind string, now func() time.Time, opts ...Option) *Doc[T] {
	if now == nil {
		now = time.Now
	}
	d := &Doc[T]{storage: storage, key: key, kind: kind, now: now}
	for _, o := range opts {
		o(&d.opts)
	}
	return d
}

// Queued returns how many updates are queued, waiting for the storage lock
// or for the round that will make them (for diagnostics and tests).
func (d *Doc[T]) Queued() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.queue)
}

// Key returns the document's storage key.
func (d *Doc[T]) Key() string { return d.key }

// BackupKey returns the key of the document's second copy.
func (d *Doc[T]) BackupKey() string { return d.key + backupSuffix }

// Read loads the stored version; found is false when nothing is stored. A
// damaged copy is replaced by the backup copy; the damage is reported to the
// hook of [WithDamageReport], and the error matches ErrUnreadable only when
// neither copy is good. Without that hook, every damage is also the error
// (found and v still say what the backup held).
func (d *Doc[T]) Read(ctx context.Context) (v Version[T], found bool, err error) {
	v, found, damaged, err := d.load(ctx)
	var dmg *damage
	if errors.As(err, &dmg) {
		err = d.report(damaged, dmg, "", false)
		if err == nil && !found {
			err = dmg.err
		}
	}
	return v, found, err
}

// load reads the document, falling back to the backup copy when the first is
// damaged. damaged holds the damaged bytes (nil when the first copy was good
// or missing); the error matches ErrUnreadable when no copy was good.
func (d *Doc[T]) load(ctx context.Context) (v Version[T], found bool, damaged []byte, err error) {
	data, err := d.storage.Load(ctx, d.key)
	if errors.Is(err, fs.ErrNotExist) {
		return v, false, nil, nil
	}
	if err != nil {
		return v, false, nil, fmt.Errorf("reading %s: %w", d.key, err)
	}
	v, err = d.decode(d.key, data)
	if err == nil || errors.Is(err, ErrNewerFormat) {
		return v, err == nil, nil, err
	}
	bad := err
	backup, berr := d.storage.Load(ctx, d.BackupKey())
	if berr == nil {
		if bv, err := d.decode(d.BackupKey(), backup); err == nil {
			return bv, true, data, &damage{bad, "backup", bv.Revision}
		} else if errors.Is(err, ErrNewerFormat) {
			return v, false, data, err
		}
	}
	return v, false, data, &damage{bad, "", 0}
}

// damage is load's error for a damaged first copy. Recovered says where the
// version returned came from ("" for nowhere).
type damage struct {
	err       error
	recovered string
	revision  uint64
}

func (e *damage) Error() string { return e.err.Error() }
func (e *damage) Unwrap() error { return e.err }

// report tells of damaged content once. It returns the error a caller should
// see: nil when the damage was reported to the hook or already reported, or
// when a good copy stood in for the damaged one and once is set.
func (d *Doc[T]) report(data []byte, dmg *damage, keptAside string, once bool) error {
	sum := sha256.Sum256(data)
	d.mu.Lock()
	fresh := sum != d.reported
	d.reported = sum
	d.mu.Unlock()
	if d.opts.damaged != nil {
		if fresh {
			d.opts.damaged(Damage{Key: d.key, Err: dmg.err, Recovered: dmg.recovered, Revision: dmg.revision, KeptAside: keptAside})
		}
		return nil
	}
	if once && !fresh {
		return nil
	}
	return dmg.err
}

// Sync reads the stored version and offers it to h; applied says whether h
// put it in force. A damaged copy is replaced by the backup copy, and the
// damage reported once per content (to the hook of [WithDamageReport], or
// else as Sync's error); when neither copy is good, h keeps what it has.
func (d *Doc[T]) Sync(ctx context.Context, h Holder[T]) (applied bool, err error) {
	v, found, damaged, err := d.load(ctx)
	var dmg *damage
	if errors.As(err, &dmg) {
		err = d.report(damaged, dmg, "", true)
	}
	if !found {
		return false, err
	}
	return h.Offer(v), err
}

// update is one caller's change, queued for the leader.
type update[T any] struct {
	h      Holder[T]
	change func(cur T, rev uint64) (next T, changed bool, err error)
	// done is closed once the result below is set; lead receives a value
	// when this caller is to become the leader.
	done    chan struct{}
	lead    chan struct{}
	v       Version[T]
	changed bool
	err     error
}

// Update changes the document by a read-modify-write under the storage's
// lock, which every instance sharing the storage takes for this document.
//
// The stored version is offered to h first, so that h is current; change is
// then given the newer of the stored version and the one h has in force (h's
// is newer only when the storage lost or garbled the document), and the
// revision its result will be written with, which is above both. When change
// reports a change, the result is written and offered to h.
//
// Concurrent updates of one Doc are combined: each caller queues its change,
// and one of them (the leader) takes the storage lock once, gives every
// queued change (of the same holder) in queue order the result of the one
// before, writes once and hands each caller its own result. A change that
// fails or changes nothing affects no other; a failed lock, read or write
// fails every change of the round. So N concurrent updates cost one lock and
// one write, not N.
//
// A damaged stored copy never blocks an update: the damaged bytes are kept
// aside under key+".unreadable", and the change is based on the newer of the
// backup copy and the version in force. Every write stores the document
// under its key and then under key+".backup": a write cut short at any point
// leaves one good copy. One in a newer format is left alone and the update
// fails with ErrNewerFormat.
//
// The storage lock is tried for [LockProbe] first. When it is held, the
// record its holder left (key+".lock-owner") is read: a holder that was a
// process on this machine (same host name and PID namespace) that no longer
// runs, or an earlier run of this process's PID (a restarted container), has
// crashed, and its lock is broken at once. Otherwise the update waits for
// the lock as the storage does (Caddy's file_system storage: until the
// holder releases it, or 10 s after the holder last refreshed it).
//
// change must not modify its argument: it may be the version in force. It
// may run on another caller's goroutine (the leader's), so it must not need
// a lock its own caller holds while it calls Update.
func (d *Doc[T]) Update(ctx context.Context, h Holder[T], change func(cur T, rev uint64) (next T, changed bool, err error)) (Version[T], bool, error) {
	u := &update[T]{h: h, change: change, done: make(chan struct{}), lead: make(chan struct{}, 1)}
	d.mu.Lock()
	d.queue = append(d.queue, u)
	leader := !d.leading
	d.leading = true
	queued := d.queued
	d.mu.Unlock()
	if queued != nil {
		queued()
	}
	if !leader {
		select {
		case <-u.done:
			return u.v, u.changed, u.err
		case <-u.lead:
		case <-ctx.Done():
			d.mu.Lock()
			if i := indexOf(d.queue, u); i >= 0 {
				d.queue = append(d.queue[:i], d.queue[i+1:]...)
				select {
				case <-u.lead: // leadership was handed over meanwhile
					d.handOffLocked()
				default:
				}
				d.mu.Unlock()
				return Version[T]{}, false, fmt.Errorf("updating %s: %w", d.key, ctx.Err())
			}
			d.mu.Unlock()
			// A leader has taken the change: its result is coming.
			<-u.done
			return u.v, u.changed, u.err
		}
	}
	// The leader runs rounds until its own change is done, then hands the
	// queue to the first caller still waiting (also when a change panics,
	// so that the others are not left waiting for a leader).
	defer func() {
		if p := recover(); p != nil {
			d.mu.Lock()
			d.handOffLocked()
			d.mu.Unlock()
			panic(p)
		}
	}()
	for {
		select {
		case <-u.done:
			d.mu.Lock()
			d.handOffLocked()
			d.mu.Unlock()
			return u.v, u.changed, u.err
		default:
		}
		d.round(ctx)
	}
}

func indexOf[T any](q []*update[T], u *update[T]) int {
	for i, x := range q {
		if x == u {
			return i
		}
	}
	return -1
}

// handOffLocked makes the first queued caller the leader, or ends the
// leadership when none waits. Callers hold d.mu.
func (d *Doc[T]) handOffLocked() {
	if len(d.queue) == 0 {
		d.leading = false
		return
	}
	d.queue[0].lead <- struct{}{}
}

// take removes the queued updates of the first one's holder from the queue.
func (d *Doc[T]) take() []*update[T] {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.queue) == 0 {
		return nil
	}
	h := d.queue[0].h
	var batch, rest []*update[T]
	for _, u := range d.queue {
		if u.h == h {
			batch = append(batch, u)
		} else {
			rest = append(rest, u)
		}
	}
	d.queue = rest
	return batch
}

// round takes the storage lock, then every queued update of one holder, and
// applies them with one write.
func (d *Doc[T]) round(ctx context.Context) {
	if err := d.lock(ctx); err != nil {
		for _, u := range d.take() {
			u.err = err
			close(u.done)
		}
		return
	}
	// Taken after the lock, so that the callers who queued while the lock
	// was awaited share this round.
	batch := d.take()
	defer func() {
		// Unlock even when ctx ended: a lock left behind blocks every
		// instance until it goes stale.
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), unlockTimeout)
		defer cancel()
		d.unlock(uctx)
		// A change that panicked fails the round for every caller, and
		// the panic goes on up the leader's goroutine.
		p := recover()
		for _, u := range batch {
			if p != nil {
				u.v, u.changed, u.err = Version[T]{}, false, fmt.Errorf("updating %s: a change panicked: %v", d.key, p)
			}
			close(u.done)
		}
		if p != nil {
			panic(p)
		}
	}()
	if len(batch) == 0 {
		return
	}
	h := batch[0].h
	fail := func(err error) {
		for _, u := range batch {
			u.v, u.changed, u.err = Version[T]{}, false, err
		}
	}
	stored, found, damaged, err := d.load(ctx)
	var dmg *damage
	switch {
	case errors.As(err, &dmg):
		if err := d.storage.Store(ctx, d.key+unreadableSuffix, damaged); err != nil {
			fail(fmt.Errorf("keeping the unreadable %s aside: %w", d.key, err))
			return
		}
	case err != nil:
		fail(err)
		return
	}
	if found {
		h.Offer(stored)
	}
	base := stored
	cur, has := h.Current()
	if has && (!found || cur.Revision > stored.Revision) {
		base = cur
	}
	if dmg != nil {
		if has && (dmg.recovered == "" || cur.Revision > dmg.revision) {
			dmg.recovered, dmg.revision = "in force", cur.Revision
		}
		_ = d.report(damaged, dmg, d.key+unreadableSuffix, false)
	}
	now := d.now().UTC()
	// The revision is one above every revision seen, and at least the
	// writer's clock in milliseconds: a document recreated after the
	// storage lost it then still outranks what other instances hold.
	rev := max(stored.Revision, cur.Revision) + 1
	if ms := now.UnixMilli(); ms > 0 && uint64(ms) > rev {
		rev = uint64(ms)
	}
	value, wrote := base.Value, false
	for _, u := range batch {
		next, changed, err := u.change(value, rev)
		u.err = err
		if err != nil || !changed {
			continue
		}
		value, u.changed, wrote = next, true, true
	}
	if !wrote {
		for _, u := range batch {
			u.v = base
		}
		return
	}
	v := Version[T]{Revision: rev, UpdatedAt: now, Value: value}
	if err := d.write(ctx, v); err != nil {
		// Every change of the round was made on a state that is now not
		// stored, so every caller learns of it, even those whose own
		// change changed nothing.
		for _, u := range batch {
			if u.err == nil {
				u.err = err
			}
			u.changed = false
		}
		return
	}
	h.Offer(v)
	for _, u := range batch {
		u.v = v
	}
}

// write stores v under the key, then under the backup key. The order means
// that a write cut short leaves a good copy: while the first is written the
// backup holds the previous version, and while the backup is written the
// first holds v.
func (d *Doc[T]) write(ctx context.Context, v Version[T]) error {
	out, err := d.encode(v)
	if err != nil {
		return err
	}
	if err := d.storage.Store(ctx, d.key, out); err != nil {
		return fmt.Errorf("storing %s: %w", d.key, err)
	}
	if err := d.storage.Store(ctx, d.BackupKey(), out); err != nil {
		// The document is stored: the change stands, only the next
		// damage could not be recovered from until a later write.
		return nil
	}
	return nil
}

func (d *Doc[T]) encode(v Version[T]) ([]byte, error) {
	body, err := json.Marshal(v.Value)
	if err != nil {
		return nil, fmt.Errorf("encoding %s: %w", d.key, err)
	}
	body = bytes.TrimSpace(body)
	if len(body) < 2 || body[0] != '{' {
		return nil, fmt.Errorf("encoding %s: the document is not a JSON object", d.key)
	}
	head, err := json.Marshal(header{Format: format, Kind: d.kind, Revision: v.Revision, UpdatedAt: v.UpdatedAt})
	if err != nil {
		return nil, fmt.Errorf("encoding %s: %w", d.key, err)
	}
	out := head[:len(head)-1] // drop the closing brace
	if inner := bytes.TrimSpace(body[1 : len(body)-1]); len(inner) > 0 {
		out = append(out, ',')
		out = append(out, inner...)
	}
	return append(out, '}'), nil
}

func (d *Doc[T]) decode(key string, data []byte) (Version[T], error) {
	var v Version[T]
	// Only an object is a document: JSON null or an array would otherwise
	// decode as an empty document, which is damage, not a document.
	if trimmed := bytes.TrimSpace(data); len(trimmed) == 0 {
		return v, fmt.Errorf("%w: %s is empty", ErrUnreadable, key)
	} else if trimmed[0] != '{' {
		return v, fmt.Errorf("%w: %s is not a JSON object", ErrUnreadable, key)
	}
	var h header
	if err := json.Unmarshal(data, &h); err != nil {
		return v, fmt.Errorf("%w: %s: %v", ErrUnreadable, key, err)
	}
	if h.Format > format {
		return v, fmt.Errorf("%w: %s has format %d, this release reads %d", ErrNewerFormat, key, h.Format, format)
	}
	if h.Format != 0 && h.Kind != d.kind {
		return v, fmt.Errorf("%w: %s holds a %q document, not %q", ErrUnreadable, key, h.Kind, d.kind)
	}
	if err := json.Unmarshal(data, &v.Value); err != nil {
		return v, fmt.Errorf("%w: %s: %v", ErrUnreadable, key, err)
	}
	// Format 0 is a document from before envelopes: the same object, at
	// revision 0, so that any write made since outranks it.
	v.Revision, v.UpdatedAt = h.Revision, h.UpdatedAt
	return v, nil
}

// Package storedoc keeps small JSON documents in a storage that several
// instances share (Caddy's storage: the file system, Redis, Consul, S3 ...)
// and in force on each instance, under one protocol:
//
//   - Every document carries a revision that grows with every write, so
//     instances order versions by revision, not by their clocks or by storage
//     modification times.
//   - Every write is a read-modify-write under the storage's lock
//     ([Doc.Update]), so no instance overwrites a change it has not seen.
//   - A version read or written is put in force only when it is newer than the
//     version in force ([Holder.Offer]), so a read that was slow, or that
//     raced with a write, can never undo a newer change.
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
// as certmagic requires of every storage.
type Storage interface {
	Lock(ctx context.Context, name string) error
	Unlock(ctx context.Context, name string) error
	Store(ctx context.Context, key string, value []byte) error
	Load(ctx context.Context, key string) ([]byte, error)
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

// Doc is one document in storage. T must marshal to a JSON object whose
// fields do not use the envelope's names (format, kind, revision,
// updated_at). Use it by pointer; it is safe for concurrent use.
type Doc[T any] struct {
	storage Storage
	key     string
	kind    string
	now     func() time.Time

	mu       sync.Mutex
	reported [sha256.Size]byte // the unreadable content last reported by Sync
}

// New returns the document kind stored under key. now is the clock that
// stamps writes (nil: time.Now).
func New[T any](storage Storage, key, kind string, now func() time.Time) *Doc[T] {
	if now == nil {
		now = time.Now
	}
	return &Doc[T]{storage: storage, key: key, kind: kind, now: now}
}

// Key returns the document's storage key.
func (d *Doc[T]) Key() string { return d.key }

// Read loads the stored version; found is false when nothing is stored.
func (d *Doc[T]) Read(ctx context.Context) (v Version[T], found bool, err error) {
	data, err := d.storage.Load(ctx, d.key)
	if errors.Is(err, fs.ErrNotExist) {
		return v, false, nil
	}
	if err != nil {
		return v, false, fmt.Errorf("reading %s: %w", d.key, err)
	}
	v, err = d.decode(data)
	if err != nil {
		return v, false, err
	}
	return v, true, nil
}

// Sync reads the stored version and offers it to h; applied says whether h
// put it in force. An unreadable document is reported once per content:
// later syncs of the same bytes return no error.
func (d *Doc[T]) Sync(ctx context.Context, h Holder[T]) (applied bool, err error) {
	data, err := d.storage.Load(ctx, d.key)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("reading %s: %w", d.key, err)
	}
	v, err := d.decode(data)
	if err != nil {
		sum := sha256.Sum256(data)
		d.mu.Lock()
		defer d.mu.Unlock()
		if sum == d.reported {
			return false, nil
		}
		d.reported = sum
		return false, err
	}
	return h.Offer(v), nil
}

// Update changes the document by a read-modify-write under the storage's
// lock, which every instance sharing the storage takes for this document.
//
// The stored version is offered to h first, so that h is current; change is
// then given the newer of the stored version and the one h has in force (h's
// is newer only when the storage lost or garbled the document), and the
// revision its result will be written with, which is above both. When change
// reports a change, the result is written and offered to h. An unreadable stored document is kept aside under
// key+".unreadable" before it is replaced; one in a newer format is left
// alone and the update fails with ErrNewerFormat.
//
// change must not modify its argument: it may be the version in force.
func (d *Doc[T]) Update(ctx context.Context, h Holder[T], change func(cur T, rev uint64) (next T, changed bool, err error)) (Version[T], bool, error) {
	var none Version[T]
	if err := d.storage.Lock(ctx, d.key); err != nil {
		return none, false, fmt.Errorf("locking %s in storage: %w", d.key, err)
	}
	defer func() {
		// Unlock even when ctx ended: a lock left behind blocks every
		// instance until it goes stale.
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = d.storage.Unlock(uctx, d.key)
	}()

	data, err := d.storage.Load(ctx, d.key)
	found := err == nil
	var stored Version[T]
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return none, false, fmt.Errorf("reading %s: %w", d.key, err)
	default:
		stored, err = d.decode(data)
		switch {
		case errors.Is(err, ErrNewerFormat):
			return none, false, err
		case err != nil:
			if err := d.storage.Store(ctx, d.key+".unreadable", data); err != nil {
				return none, false, fmt.Errorf("keeping the unreadable %s aside: %w", d.key, err)
			}
			found = false
		}
	}
	if found {
		h.Offer(stored)
	}
	base := stored
	cur, has := h.Current()
	if has && (!found || cur.Revision > stored.Revision) {
		base = cur
	}
	now := d.now().UTC()
	// The revision is one above every revision seen, and at least the
	// writer's clock in milliseconds: a document recreated after the
	// storage lost it then still outranks what other instances hold.
	rev := max(stored.Revision, cur.Revision) + 1
	if ms := now.UnixMilli(); ms > 0 && uint64(ms) > rev {
		rev = uint64(ms)
	}
	next, changed, err := change(base.Value, rev)
	if err != nil || !changed {
		return base, false, err
	}
	v := Version[T]{Revision: rev, UpdatedAt: now, Value: next}
	out, err := d.encode(v)
	if err != nil {
		return none, false, err
	}
	if err := d.storage.Store(ctx, d.key, out); err != nil {
		return none, false, fmt.Errorf("storing %s: %w", d.key, err)
	}
	h.Offer(v)
	return v, true, nil
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

func (d *Doc[T]) decode(data []byte) (Version[T], error) {
	var v Version[T]
	var h header
	if err := json.Unmarshal(data, &h); err != nil {
		return v, fmt.Errorf("%w: %s: %v", ErrUnreadable, d.key, err)
	}
	if h.Format > format {
		return v, fmt.Errorf("%w: %s has format %d, this release reads %d", ErrNewerFormat, d.key, h.Format, format)
	}
	if h.Format != 0 && h.Kind != d.kind {
		return v, fmt.Errorf("%w: %s holds a %q document, not %q", ErrUnreadable, d.key, h.Kind, d.kind)
	}
	if err := json.Unmarshal(data, &v.Value); err != nil {
		return v, fmt.Errorf("%w: %s: %v", ErrUnreadable, d.key, err)
	}
	// Format 0 is a document from before envelopes: the same object, at
	// revision 0, so that any write made since outranks it.
	v.Revision, v.UpdatedAt = h.Revision, h.UpdatedAt
	return v, nil
}

package storedoc

import "sync/atomic"

// Replica holds the version of a document in force on this instance, for
// documents whose newest version replaces the older ones as a whole
// (overrides, for example). Readers never block.
type Replica[T any] struct {
	cur      atomic.Pointer[Version[T]]
	onChange func()
}

// NewReplica returns an empty replica. onChange (optional) is called after
// every version the replica puts in force. Calls may overlap or arrive out of
// order when versions are offered concurrently, so onChange should read
// [Replica.Current] rather than remember what it was told.
func NewReplica[T any](onChange func()) *Replica[T] {
	return &Replica[T]{onChange: onChange}
}

// Current implements Holder.
func (r *Replica[T]) Current() (Version[T], bool) {
	if v := r.cur.Load(); v != nil {
		return *v, true
	}
	return Version[T]{}, false
}

// Offer implements Holder: v replaces the version in force only when its
// revision is higher (or when nothing is in force yet).
func (r *Replica[T]) Offer(v Version[T]) bool {
	next := &v
	for {
		cur := r.cur.Load()
		if cur != nil && v.Revision <= cur.Revision {
			return false
		}
		if r.cur.CompareAndSwap(cur, next) {
			if r.onChange != nil {
				r.onChange()
			}
			return true
		}
	}
}

// Value returns the value in force, or T's zero value before any.
func (r *Replica[T]) Value() T {
	v, _ := r.Current()
	return v.Value
}

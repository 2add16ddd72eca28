package storedoc

import "encoding/json"

// OnQueued has f called after each update d queues.
func OnQueued[T any](d *Doc[T], f func()) {
	d.mu.Lock()
	d.queued = f
	d.mu.Unlock()
}

// OwnerRecord is the lock holder's record this process would write, with
// another PID or run: what a crashed process (or a crashed earlier run of
// this process's PID) leaves behind.
func OwnerRecord(pid int, run string) []byte {
	o := self()
	o.PID, o.Run = pid, run
	data, _ := json.Marshal(o)
	return data
}

// OwnerKey is the key of the lock holder's record of d.
func OwnerKey[T any](d *Doc[T]) string { return d.key + ownerSuffix }

// Package storedoctest provides storages for tests of code built on
// storedoc: an in-memory storage with real locking, and a way to hold a read
// in mid-flight so that a test can force the interleaving of a read with a
// concurrent write.
package storedoctest

import (
	"context"
	"fmt"
	"io/fs"
	"maps"
	"sync"
)

// Memory is an in-memory storage. Locks are exclusive and wait for their
// holder (or ctx), as Caddy's storages do.
type Memory struct {
	mu       sync.Mutex
	values   map[string][]byte
	locks    map[string]chan struct{} // held locks; closed on unlock
	stores   int
	storesOf map[string]int
	// pause, when set for a key, holds the next Load of it (see PauseLoad);
	// pauseLock, when set for a name, the next Lock of it (see PauseLock).
	pause     map[string]*Pause
	pauseLock map[string]*Pause
}

// NewMemory returns an empty storage.
func NewMemory() *Memory {
	return &Memory{values: map[string][]byte{}, locks: map[string]chan struct{}{}, storesOf: map[string]int{},
		pause: map[string]*Pause{}, pauseLock: map[string]*Pause{}}
}

// Lock implements storedoc.Storage.
func (m *Memory) Lock(ctx context.Context, name string) error {
	m.mu.Lock()
	p := m.pauseLock[name]
	delete(m.pauseLock, name)
	m.mu.Unlock()
	if p != nil {
		close(p.loaded)
		select {
		case <-p.release:
		case <-ctx.Done():
			return fmt.Errorf("waiting for lock %s: %w", name, ctx.Err())
		}
	}
	for {
		m.mu.Lock()
		held, ok := m.locks[name]
		if !ok {
			m.locks[name] = make(chan struct{})
			m.mu.Unlock()
			return nil
		}
		m.mu.Unlock()
		select {
		case <-held:
		case <-ctx.Done():
			return fmt.Errorf("waiting for lock %s: %w", name, ctx.Err())
		}
	}
}

// Unlock implements storedoc.Storage.
func (m *Memory) Unlock(_ context.Context, name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	held, ok := m.locks[name]
	if !ok {
		return fmt.Errorf("unlock %s: not locked", name)
	}
	delete(m.locks, name)
	close(held)
	return nil
}

// Store implements storedoc.Storage.
func (m *Memory) Store(_ context.Context, key string, value []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.values[key] = append([]byte(nil), value...)
	m.stores++
	m.storesOf[key]++
	return nil
}

// Delete implements storedoc.Storage.
func (m *Memory) Delete(_ context.Context, key string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.values[key]; !ok {
		return fmt.Errorf("%s: %w", key, fs.ErrNotExist)
	}
	delete(m.values, key)
	return nil
}

// Locked reports whether the lock name is held.
func (m *Memory) Locked(name string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.locks[name]
	return ok
}

// Load implements storedoc.Storage. A missing key is fs.ErrNotExist.
func (m *Memory) Load(ctx context.Context, key string) ([]byte, error) {
	m.mu.Lock()
	v, ok := m.values[key]
	v = append([]byte(nil), v...)
	p := m.pause[key]
	delete(m.pause, key)
	m.mu.Unlock()
	if p != nil {
		// The bytes are read; the caller sees them only once released.
		close(p.loaded)
		select {
		case <-p.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if !ok {
		return nil, fmt.Errorf("%s: %w", key, fs.ErrNotExist)
	}
	return v, nil
}

// Get returns the stored bytes of key (nil when absent).
func (m *Memory) Get(key string) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.values[key]...)
}

// Keys returns a copy of every stored key and value.
func (m *Memory) Keys() map[string][]byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return maps.Clone(m.values)
}

// Stores counts the writes so far.
func (m *Memory) Stores() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stores
}

// StoresOf counts the writes of key so far.
func (m *Memory) StoresOf(key string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.storesOf[key]
}

// Pause is a Load held between reading the stored bytes and returning them,
// or a Lock held before it tries the lock.
type Pause struct {
	loaded  chan struct{}
	release chan struct{}
	once    sync.Once
}

// Loaded is closed once the paused Load has read the bytes it will return
// (the paused Lock has been called).
func (p *Pause) Loaded() <-chan struct{} { return p.loaded }

// Release lets the paused Load return what it read. Idempotent.
func (p *Pause) Release() { p.once.Do(func() { close(p.release) }) }

// PauseLoad holds the next Load of key after it has read the value, until
// Release: whatever is written meanwhile, that Load returns the older bytes.
func (m *Memory) PauseLoad(key string) *Pause {
	p := &Pause{loaded: make(chan struct{}), release: make(chan struct{})}
	m.mu.Lock()
	m.pause[key] = p
	m.mu.Unlock()
	return p
}

// PauseLock holds the next Lock of name, before it tries the lock, until
// Release: the caller is known to be waiting for the lock (Loaded), for as
// long as the test needs.
func (m *Memory) PauseLock(name string) *Pause {
	p := &Pause{loaded: make(chan struct{}), release: make(chan struct{})}
	m.mu.Lock()
	m.pauseLock[name] = p
	m.mu.Unlock()
	return p
}

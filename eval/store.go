package eval

import "sync/atomic"

// Store holds the definitions in force and swaps them atomically: a reader gets
// either the old set or the new one, never part of each. Every stored set gets
// a new generation number, which the result cache keys on.
type Store struct {
	current    atomic.Pointer[Definitions]
	generation atomic.Uint64
}

var emptyDefinitions = &Definitions{byKey: map[string]*Flag{}, groupTypes: map[string]string{}, scratch: newScratchPool()}

// NewStore returns a store holding an empty set of definitions.
func NewStore() *Store {
	s := &Store{}
	s.Swap(emptyDefinitions)
	return s
}

// Load returns the definitions in force. It never returns nil.
func (s *Store) Load() *Definitions {
	if d := s.current.Load(); d != nil {
		return d
	}
	return emptyDefinitions
}

// Swap puts d in force under a new generation and returns the set it replaced.
// d itself is not modified (the store keeps a shallow copy), so the same parsed
// definitions can be stored again, e.g. with other overrides.
func (s *Store) Swap(d *Definitions) *Definitions {
	if d == nil {
		d = emptyDefinitions
	}
	cp := *d
	cp.generation = s.generation.Add(1)
	return s.current.Swap(&cp)
}

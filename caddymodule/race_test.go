//go:build race

package caddymodule

// raceEnabled: the race detector slows the handler ~10x; long-running tests
// scale their loops down.
const raceEnabled = true

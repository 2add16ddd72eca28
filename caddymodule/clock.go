package caddymodule

import "time"

// clock is the app's time source: when flags were evaluated and fetched, when
// rollout steps began, and the ticks of its background work. Caddy runs the
// app on the real clock; tests move a manual one.
type clock interface {
	Now() time.Time
	// NewTicker returns a channel that receives a tick every d, and a
	// function that stops it.
	NewTicker(d time.Duration) (<-chan time.Time, func())
}

// realClock is the wall clock.
type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) NewTicker(d time.Duration) (<-chan time.Time, func()) {
	t := time.NewTicker(d)
	return t.C, t.Stop
}

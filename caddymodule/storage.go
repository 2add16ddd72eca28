package caddymodule

import (
	"fmt"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/flagsplit/flagsplit/rollout"
	"github.com/flagsplit/flagsplit/storedoc"
)

// What the app keeps in Caddy's storage, under feature_flags/<namespace>/,
// where the namespace is the PostHog project key, or "local" without one.
// The shared documents (overrides, rollout progress, flag activity) follow one
// protocol (package storedoc): a revision in every document, writes by
// read-modify-write under the storage lock named after the document's key,
// and a version put in force only when it is newer than the one in force.
// Each is kept twice (<key> and <key>.backup), so that damage to one copy
// loses nothing.
// The last-known-good definitions are written by one kind of writer only (an
// answer from PostHog) and read at start, so they need neither.
const (
	definitionsKey = "definitions.json"
	overridesKey   = "overrides.json"
	rolloutsKey    = "rollouts.json"
	activityKey    = "activity.json"
)

// documents are the shared documents of one app, over its storage.
type documents struct {
	overrides *storedoc.Doc[overrideSet]
	rollouts  *storedoc.Doc[rollout.Records]
	activity  *storedoc.Doc[storedActivity]
}

func (a *App) newDocuments(st storedoc.Storage) documents {
	now := a.clock.Now
	return documents{
		overrides: storedoc.New[overrideSet](st, a.storageKey(overridesKey), "overrides", now, a.documentReports("overrides")...),
		rollouts:  storedoc.New[rollout.Records](st, a.storageKey(rolloutsKey), "rollouts", now, a.documentReports("rollouts")...),
		activity:  storedoc.New[storedActivity](st, a.storageKey(activityKey), "activity", now, a.documentReports("activity")...),
	}
}

// documentReports log what goes wrong with a stored document: a damaged copy
// (an error, counted in storage_damaged_total: the document served from its
// other copy or from what is in force, and the next write replaces it) and a
// lock broken because its holder had crashed.
func (a *App) documentReports(document string) []storedoc.Option {
	damaged := func(d storedoc.Damage) {
		storageDamaged.WithLabelValues(document).Inc()
		fields := []zap.Field{zap.String("document", document), zap.String("key", d.Key), zap.Error(d.Err)}
		if d.Recovered != "" {
			fields = append(fields, zap.String("using", d.Recovered), zap.Uint64("revision", d.Revision))
		}
		if d.KeptAside != "" {
			fields = append(fields, zap.String("kept_aside", d.KeptAside))
		}
		msg := "stored document is damaged; using its last good copy"
		if d.Recovered == "" {
			msg = "stored document is damaged and has no good copy; keeping what is in force"
		}
		a.logger.Error(msg, fields...)
	}
	stale := func(s storedoc.StaleLock) {
		a.logger.Warn("broke a storage lock its holder left when it crashed",
			zap.String("document", document), zap.String("lock", s.Name), zap.String("holder", s.Owner))
	}
	return []storedoc.Option{storedoc.WithDamageReport(damaged), storedoc.WithStaleLockReport(stale)}
}

// storageKey is the key of one of the app's documents.
func (a *App) storageKey(name string) string {
	ns := "local"
	if a.PostHog != nil {
		ns = a.PostHog.ProjectAPIKey
	}
	return "feature_flags/" + ns + "/" + name
}

// storageIdentity names a storage for the engine's pool key: a config that
// moves to another storage gets state read from that storage, not the
// overrides and progress still in force from the old one. Storages that
// describe themselves (the file system storage says its path) are told
// apart; others by type.
func storageIdentity(st certmagic.Storage) string {
	if s, ok := st.(fmt.Stringer); ok {
		return s.String()
	}
	return fmt.Sprintf("%T", st)
}

// Caddy's storage is what the shared documents are kept in.
var _ storedoc.Storage = (certmagic.Storage)(nil)

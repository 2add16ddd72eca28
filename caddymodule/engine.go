package caddymodule

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/proxy"
	"github.com/flagsplit/flagsplit/rollout"
	"github.com/flagsplit/flagsplit/storedoc"
)

// sourceKind says where a definitions document came from, and so how it is
// parsed and whether it may replace the definitions in force.
type sourceKind string

const (
	// sourceFile is the definitions file of a config without a posthog
	// block: the operator's own document.
	sourceFile sourceKind = "file"
	// sourceFallbackFile is the definitions file of a config with a
	// posthog block: it serves only until PostHog or the stored copy does.
	sourceFallbackFile sourceKind = "fallback_file"
	// sourcePostHog is an answer from PostHog's definitions endpoint.
	sourcePostHog sourceKind = "posthog"
	// sourceStored is the last PostHog answer kept in storage, which serves
	// after a restart until PostHog answers again.
	sourceStored sourceKind = "storage"
	// sourceCLI is a file given to a command-line tool.
	sourceCLI sourceKind = "cli"
)

// strict reports whether a document of this kind is refused whole when any
// flag in it is malformed. An operator's file should be fixed, not half used;
// an answer from PostHog is used as far as it goes, because refusing it would
// freeze every other flag at its old definition.
func (k sourceKind) strict() bool {
	return k == sourceFile || k == sourceFallbackFile || k == sourceCLI
}

// rank orders the kinds: a document never replaces definitions of a higher
// rank. PostHog's answer outranks the stored copy, which outranks the
// fallback file; a file that is the config's only source is on par with
// PostHog.
func (k sourceKind) rank() int {
	switch k {
	case sourceFallbackFile:
		return 0
	case sourceStored:
		return 1
	}
	return 2
}

// parseDefinitions parses a definitions document as its kind requires. For
// kinds that are not strict, the malformed flags are returned beside the
// definitions, which serve them as false.
func (k sourceKind) parse(data []byte) (*eval.Definitions, []eval.Problem, error) {
	if err := checkDocument(data); err != nil {
		return nil, nil, err
	}
	defs, err := eval.Parse(data)
	if err != nil {
		return nil, nil, err
	}
	problems := defs.Problems()
	if k.strict() && len(problems) > 0 {
		msgs := make([]string, len(problems))
		for i, p := range problems {
			msgs[i] = p.String()
		}
		return nil, problems, fmt.Errorf("flag definitions are malformed: %s", strings.Join(msgs, "; "))
	}
	return defs, problems, nil
}

// definitionsSource describes a document offered to engine.install.
type definitionsSource struct {
	kind     sourceKind
	location string
	// etag is PostHog's validator for the document ("" for none).
	etag string
	// fetchedAt is when the document was fetched (the stored copy's
	// original fetch); zero means now.
	fetchedAt time.Time
	// note is kept as the source's last error although the document is
	// installed (PostHog's quota answer installs empty definitions).
	note string
}

// name is the kind as the admin API shows it: a fallback file is a file.
func (k sourceKind) name() string {
	if k == sourceFallbackFile {
		return string(sourceFile)
	}
	return string(k)
}

// sourceInfo is the definitions source in force, as the admin API shows it.
type sourceInfo struct {
	Kind     string    `json:"kind"`
	Location string    `json:"location,omitempty"`
	Loaded   time.Time `json:"loaded_at"`
	Checksum string    `json:"checksum,omitempty"`
	ETag     string    `json:"etag,omitempty"`
	Error    string    `json:"last_error,omitempty"`
}

// installResult says what engine.install did with a document.
type installResult struct {
	// changed: the document differs from the one in force and now serves.
	changed bool
	// outranked: definitions of a higher rank are in force; the document
	// was not used.
	outranked bool
	defs      *eval.Definitions
	// problems are the malformed flags of a document that serves anyway.
	problems []eval.Problem
}

// engine is the app's state that must outlive a config reload: the
// definitions in force and where they came from, the overrides, the rollouts,
// the result cache, statistics and flag activity. It is the one owner of
// that state: the rest of the module changes it only through these methods,
// and every change of definitions, overrides or rollout caps ends in one
// place (applyLocked) that puts base definitions plus overrides in force.
type engine struct {
	store    *eval.Store // read lock-free by every request
	cache    *eval.Cache
	outcomes proxy.Outcomes
	activity *activity
	// overrides are the operators' overrides in force, at the revision of
	// the shared overrides document they came from.
	overrides *storedoc.Replica[overrideSet]
	// rollouts runs the rollouts in force; their caps join the overrides.
	rollouts *rollout.Runtime

	mu sync.Mutex // guards the fields below and serialises installs
	// base is the last good definitions, before overrides, and kind the
	// kind of source they came from.
	base      *eval.Definitions
	kind      sourceKind
	source    sourceInfo
	lastFetch time.Time
	now       func() time.Time
	// invalid are the stored overrides kept out of force because the
	// definitions in force cannot take them, by flag.
	invalid map[string]invalidOverride
	// logger is the newest config's (the engine outlives configs).
	logger atomic.Pointer[zap.Logger]
}

// invalidOverride is a stored override its flag cannot take (or whose flag
// is not defined): it is kept in storage, out of force, and shown with why.
type invalidOverride struct {
	Override eval.Override `json:"override"`
	Reason   string        `json:"reason"`
}

// setLogger makes l the engine's logger.
func (e *engine) setLogger(l *zap.Logger) { e.logger.Store(l) }

// newEngine returns an engine serving empty definitions, on the clock now.
func newEngine(cacheSize int, now func() time.Time) *engine {
	e := &engine{store: eval.NewStore(), cache: eval.NewCache(cacheSize), activity: newActivity(now()), now: now}
	e.overrides = storedoc.NewReplica[overrideSet](e.apply)
	e.rollouts = rollout.NewRuntime(now)
	return e
}

// Destruct implements caddy.Destructor.
func (e *engine) Destruct() error {
	e.cache.Purge()
	return nil
}

// install offers a definitions document from src. It parses it as src's kind
// requires; a document that does not parse leaves the definitions in force
// and is recorded as the source's last error. A document of a lower rank
// than the definitions in force, or identical to them, changes nothing (the
// ETag and fetch time are still taken).
func (e *engine) install(src definitionsSource, data []byte) (installResult, error) {
	sum := sha256.Sum256(data)
	checksum := hex.EncodeToString(sum[:8])
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.base != nil && src.kind.rank() < e.kind.rank() {
		return installResult{outranked: true}, nil
	}
	now := e.now()
	if e.base != nil && src.kind == e.kind && checksum == e.source.Checksum && src.note == "" {
		e.source.ETag, e.source.Error = src.etag, ""
		if src.kind == sourcePostHog {
			e.lastFetch = now
		}
		return installResult{defs: e.base}, nil
	}
	defs, problems, err := src.kind.parse(data)
	if err != nil {
		e.source.Error = err.Error()
		definitionsErrors.Inc()
		return installResult{problems: problems}, err
	}
	loaded := src.fetchedAt
	if loaded.IsZero() {
		loaded = now
	}
	e.base, e.kind = defs, src.kind
	e.source = sourceInfo{Kind: src.kind.name(), Location: src.location, Loaded: loaded, Checksum: checksum, ETag: src.etag, Error: src.note}
	if src.kind == sourcePostHog {
		e.lastFetch = now
	}
	e.applyLocked()
	definitionsLastSuccess.SetToCurrentTime()
	definitionsFlags.Set(float64(defs.Len()))
	definitionsReady.Set(1)
	return installResult{changed: true, defs: defs, problems: problems}, nil
}

// fetched records a fetch that confirmed the definitions in force (PostHog's
// 304), with the validator it came with.
func (e *engine) fetched(etag string) {
	e.mu.Lock()
	e.lastFetch = e.now()
	e.source.ETag, e.source.Error = etag, ""
	e.mu.Unlock()
	definitionsLastSuccess.SetToCurrentTime()
}

// failed records a failure to load definitions; what is in force stays.
func (e *engine) failed(msg string) {
	e.mu.Lock()
	e.source.Error = msg
	e.mu.Unlock()
	definitionsErrors.Inc()
}

// etag is the validator of the definitions in force, sent with the next
// fetch: kept here once, for PostHog's answers and the stored copy alike.
func (e *engine) etag() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.kind != sourcePostHog && e.kind != sourceStored {
		return ""
	}
	return e.source.ETag
}

// apply puts base definitions plus the overrides and rollout caps in force.
// The overrides replica calls it after every change, and so does the rollout
// runtime; it reads the newest of both, so calls may come in any order.
func (e *engine) apply() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.applyLocked()
}

// applyLocked puts the definitions in force under a new generation, which
// also retires every cached answer. Callers hold e.mu.
//
// Stored overrides are checked against the base definitions here, on every
// change of either: one another instance wrote, or one written for
// definitions since changed, may not fit (a rollout_percentage outside
// 0..100, a variant the flag lacks, a flag not defined). Those stay out of
// force (the flag evaluates as its definition says) and in storage (the flag
// may be defined later), and are logged once and shown by the admin API.
func (e *engine) applyLocked() {
	overrides := e.overrides.Value()
	if e.base == nil {
		overridesActive.Set(float64(overrides.len()))
		return
	}
	valid, invalid := checkOverrides(e.base, overrides.m)
	e.reportInvalidLocked(invalid)
	overridesActive.Set(float64(len(valid)))
	e.store.Swap(e.base.WithOverrides(withRolloutCaps(valid, e.rollouts.InForce())))
}

// checkOverrides splits overrides into those defs can take and the others.
func checkOverrides(defs *eval.Definitions, overrides map[string]eval.Override) (map[string]eval.Override, map[string]invalidOverride) {
	var invalid map[string]invalidOverride
	for flag, o := range overrides {
		reason := "flag is not defined"
		if f, ok := defs.Flag(flag); ok {
			err := o.Validate(f)
			if err == nil {
				continue
			}
			reason = err.Error()
		}
		if invalid == nil {
			invalid = map[string]invalidOverride{}
		}
		invalid[flag] = invalidOverride{Override: o, Reason: reason}
	}
	if len(invalid) == 0 {
		return overrides, nil
	}
	valid := make(map[string]eval.Override, len(overrides)-len(invalid))
	for flag, o := range overrides {
		if _, bad := invalid[flag]; !bad {
			valid[flag] = o
		}
	}
	return valid, invalid
}

// reportInvalidLocked logs the overrides that became invalid, or valid again,
// and keeps the list for the admin API. Callers hold e.mu.
func (e *engine) reportInvalidLocked(invalid map[string]invalidOverride) {
	log := e.logger.Load()
	if log == nil {
		log = zap.NewNop()
	}
	for flag, bad := range invalid {
		if old, ok := e.invalid[flag]; !ok || !overridesEqual(old.Override, bad.Override) || old.Reason != bad.Reason {
			log.Warn("stored override is not valid for the flag definitions in force; it is kept in storage but not in force",
				zap.String("flag", flag), zap.Any("override", bad.Override), zap.String("reason", bad.Reason))
		}
	}
	for flag := range e.invalid {
		if _, still := invalid[flag]; !still {
			if _, stored := e.overrides.Value().get(flag); stored {
				log.Info("stored override is valid again and in force", zap.String("flag", flag))
			}
		}
	}
	e.invalid = invalid
}

// withRolloutCaps merges the operators' overrides with the caps the rollouts
// impose, as each ramp's Cap says: a rollout that rolled back or was aborted
// kills the flag; one below 100 % caps its rollout at min(override, step); a
// dry run imposes nothing.
func withRolloutCaps(overrides map[string]eval.Override, rollouts *rollout.Set) map[string]eval.Override {
	if rollouts.Len() == 0 {
		return overrides
	}
	merged := maps.Clone(overrides)
	if merged == nil {
		merged = map[string]eval.Override{}
	}
	for _, run := range rollouts.Runs() {
		c := run.Ramp().Cap()
		o := merged[run.Flag()]
		switch pct := c.Percentage; {
		case c.Killed:
			o.Killed = true
		case pct < 100:
			if o.RolloutPercentage == nil || *o.RolloutPercentage > pct {
				o.RolloutPercentage = &pct
			}
		default:
			continue
		}
		merged[run.Flag()] = o
	}
	return merged
}

// engineSnapshot is the engine's control-plane state at one moment.
type engineSnapshot struct {
	ready             bool
	source            sourceInfo
	lastFetch         time.Time
	overrides         map[string]eval.Override
	overridesRevision uint64
	invalidOverrides  map[string]invalidOverride
}

// snapshot returns the control-plane state, consistently.
func (e *engine) snapshot() engineSnapshot {
	e.mu.Lock()
	s := engineSnapshot{ready: e.base != nil, source: e.source, lastFetch: e.lastFetch, invalidOverrides: maps.Clone(e.invalid)}
	e.mu.Unlock()
	v, _ := e.overrides.Current()
	s.overrides, s.overridesRevision = maps.Clone(v.Value.m), v.Revision
	if s.overrides == nil {
		s.overrides = map[string]eval.Override{}
	}
	return s
}

// definitions returns the definitions in force, overrides applied.
func (e *engine) definitions() *eval.Definitions { return e.store.Load() }

package caddymodule

import (
	"context"
	"fmt"
	"runtime/debug"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/posthog"
	"github.com/flagsplit/flagsplit/proxy"
)

// Event modes.
const (
	// EventsOff sends no events.
	EventsOff = "off"
	// EventsOn reports the flags that decided something about a request: a
	// feature_flag matcher or selection policy consulted them.
	EventsOn = "on"
	// EventsAll reports every flag a feature_flags handler evaluated and
	// passed to the backend, as well as those that decided routing.
	EventsAll = "all"
)

// EventsConfig sends $feature_flag_called exposure events to PostHog, so that
// experiments and flag insights count the users this proxy served.
type EventsConfig struct {
	// Mode is "on" (flags that routed or matched the request), "all" (also
	// every flag a handler evaluated and sent to the backend) or "off".
	// Default: off.
	Mode string `json:"mode,omitempty"`

	// DedupWindow is how long a (distinct id, flag, value, groups)
	// combination, once reported, is not reported again. Default: 1h.
	DedupWindow caddy.Duration `json:"dedup_window,omitempty"`

	// QueueSize bounds the events waiting to be sent; beyond it, new events
	// are dropped (and counted) rather than slowing requests. Default: 10000.
	QueueSize int `json:"queue_size,omitempty"`

	// BatchSize is the most events per request to PostHog. Default: 500.
	BatchSize int `json:"batch_size,omitempty"`

	// FlushInterval is the longest an event waits for its batch to fill.
	// Default: 1s.
	FlushInterval caddy.Duration `json:"flush_interval,omitempty"`
}

func (c *EventsConfig) enabled() bool { return c != nil && c.Mode != "" && c.Mode != EventsOff }

func (c *EventsConfig) validate() error {
	switch c.Mode {
	case "", EventsOff, EventsOn, EventsAll:
	default:
		return fmt.Errorf("posthog events: mode must be on, off or all, got %q", c.Mode)
	}
	if c.DedupWindow < 0 || c.FlushInterval < 0 {
		return fmt.Errorf("posthog events: durations must be positive")
	}
	if c.QueueSize < 0 || c.BatchSize < 0 {
		return fmt.Errorf("posthog events: queue_size and batch_size must be positive")
	}
	return nil
}

// eventPipes holds the event pipes, which outlive a config reload: a reload
// that keeps the event settings keeps the pipe, its queue and its delivery
// loop, so no event changes hands.
var eventPipes = caddy.NewUsagePool()

// eventPipe is a queue to PostHog plus the memory of what was reported.
type eventPipe struct {
	sender    *posthog.Sender
	exposures *proxy.Exposures
	logger    *zap.Logger
	// libVersion is flagsplit's version, reported as $lib_version.
	libVersion string
	sent       atomic.Int64
	dropped    atomic.Int64
	// lastDropLog rate-limits the log line about a full queue.
	lastDropLog atomic.Int64
}

// closeBudget bounds the last delivery when the pipe's last config goes away
// (shutdown, or a reload to other event settings): the queue, the batch being
// formed and the deliveries under way get this long, then the requests still
// under way are cancelled and what is undelivered is counted as dropped
// ("shutdown"). Caddy calls Destruct after every app has stopped, so on
// shutdown the servers have stopped accepting by then; a reload that keeps
// the pipe never waits for it.
const closeBudget = 4 * time.Second

// Destruct implements caddy.Destructor: the last config using the pipe is
// gone. The sender delivers what it holds within closeBudget and stops.
func (p *eventPipe) Destruct() error {
	ctx, cancel := context.WithTimeout(context.Background(), closeBudget)
	defer cancel()
	before := p.dropped.Load()
	start := time.Now()
	if err := p.sender.Close(ctx); err != nil {
		p.logger.Warn("the PostHog event sender stopped with events undelivered; they are counted as dropped",
			zap.Error(err), zap.Duration("took", time.Since(start)), zap.Int64("dropped", p.dropped.Load()-before),
			zap.Int64("sent_total", p.sent.Load()), zap.Int64("dropped_total", p.dropped.Load()))
	}
	return nil
}

// provisionEvents sets up (or joins) the event pipe for the PostHog project.
func (a *App) provisionEvents(logger *zap.Logger) error {
	cfg := a.PostHog.Events
	if cfg == nil {
		return nil
	}
	if err := cfg.validate(); err != nil {
		return err
	}
	if !cfg.enabled() {
		return nil
	}
	if cfg.DedupWindow == 0 {
		cfg.DedupWindow = caddy.Duration(proxy.DefaultDedupWindow)
	}
	if cfg.QueueSize == 0 {
		cfg.QueueSize = posthog.DefaultQueueSize
	}
	if cfg.BatchSize == 0 {
		cfg.BatchSize = posthog.DefaultBatchSize
	}
	if cfg.FlushInterval == 0 {
		cfg.FlushInterval = caddy.Duration(posthog.DefaultFlushInterval)
	}
	a.eventsKey = fmt.Sprintf("%s|%s|queue=%d|batch=%d|flush=%s|dedup=%s", a.PostHog.Host, a.PostHog.ProjectAPIKey,
		cfg.QueueSize, cfg.BatchSize, time.Duration(cfg.FlushInterval), time.Duration(cfg.DedupWindow))
	val, _, err := eventPipes.LoadOrNew(a.eventsKey, func() (caddy.Destructor, error) {
		p := &eventPipe{exposures: proxy.NewExposures(time.Duration(cfg.DedupWindow), 0), libVersion: libVersion(), logger: logger}
		s := posthog.NewSender(a.PostHog.Host, a.PostHog.ProjectAPIKey, cfg.QueueSize)
		s.BatchSize, s.FlushInterval, s.Timeout = cfg.BatchSize, time.Duration(cfg.FlushInterval), time.Duration(a.PostHog.Timeout)
		s.UserAgent = userAgent()
		s.Sent = func(n int) {
			p.sent.Add(int64(n))
			eventsSent.Add(float64(n))
		}
		s.Dropped = func(n int, reason string) {
			p.dropped.Add(int64(n))
			eventsDropped.Add(float64(n))
			p.logDrop(logger, n, reason)
		}
		p.sender = s
		return p, nil
	})
	if err != nil {
		return fmt.Errorf("posthog events: %w", err)
	}
	a.events = val.(*eventPipe)
	a.eventsAll = cfg.Mode == EventsAll
	return nil
}

// logDrop reports lost events; a full queue under load is reported at most
// once a minute rather than once per request.
func (p *eventPipe) logDrop(logger *zap.Logger, n int, reason string) {
	if reason == "queue_full" {
		now := time.Now().Unix()
		last := p.lastDropLog.Load()
		if now-last < 60 || !p.lastDropLog.CompareAndSwap(last, now) {
			return
		}
		logger.Warn("the PostHog event queue is full; exposure events are being dropped",
			zap.Int64("dropped_total", p.dropped.Load()))
		return
	}
	logger.Warn("exposure events could not be delivered to PostHog and were dropped",
		zap.Int("events", n), zap.String("reason", reason))
}

// startEvents starts the pipe's delivery loop, which the pipe owns: it runs
// until the last config using the pipe is cleaned up, so a reload that keeps
// the event settings neither stops it nor hands a batch to another loop.
func (a *App) startEvents() {
	if a.events != nil {
		a.events.sender.Start()
	}
}

// flushEvents has the sender send what was queued under this config now,
// rather than at the next batch or flush interval; called when the app stops
// (reload or shutdown). It does not wait for PostHog: on a reload that keeps
// the event settings the sender carries on with them, and when the pipe's last
// config goes away its Destruct does the final, bounded delivery. So neither a
// reload nor a shutdown waits on a slow or hanging /batch/ here.
func (a *App) flushEvents() {
	if a.events != nil {
		a.events.sender.FlushAsync()
	}
}

func (a *App) cleanupEvents() error {
	if a.eventsKey == "" {
		return nil
	}
	_, err := eventPipes.Delete(a.eventsKey)
	return err
}

// eventsStatus is the admin API's view of the event pipe.
type eventsStatus struct {
	Mode        string `json:"mode"`
	DedupWindow string `json:"dedup_window"`
	Pending     int    `json:"pending"`
	Sent        int64  `json:"sent"`
	Dropped     int64  `json:"dropped"`
}

func (a *App) eventsStatus() *eventsStatus {
	if a.events == nil {
		return nil
	}
	return &eventsStatus{Mode: a.PostHog.Events.Mode, DedupWindow: a.events.exposures.Window().String(),
		Pending: a.events.sender.Pending(), Sent: a.events.sent.Load(), Dropped: a.events.dropped.Load()}
}

// expose reports that the request was served result for the flag, once per
// dedup window per subject. Inconclusive answers are not reported: the user
// got the default, not PostHog's answer.
func (st *requestState) expose(result eval.Result) {
	pipe := st.handler.app.events
	if pipe == nil || result.Inconclusive() || st.subject.DistinctID == "" {
		return
	}
	now := st.handler.app.clock.Now()
	if !pipe.exposures.First(st.subject.DistinctID, result.Key, result.Value(), st.subject.Groups, now) {
		return
	}
	defs := st.bound.defs
	flag, _ := defs.Flag(result.Key)
	x := posthog.Exposure{DistinctID: st.subject.DistinctID, DeviceID: st.subject.DeviceID, Flag: flag,
		Result: result, Groups: st.subject.Groups, Minimal: defs.MinimalFlagCalledEvents, Time: now,
		LibVersion: pipe.libVersion}
	pipe.sender.Enqueue(x.Event())
}

// exposeRouted reports a flag that decided something about the request, with
// the value the request was served: false when it fell back to the default
// upstream, whatever the flag said.
func (st *requestState) exposeRouted(r *routedFlag) {
	if st.handler.app.events == nil || !r.exposable() {
		return
	}
	var result eval.Result
	if r.index >= 0 {
		result = st.results.At(r.index)
	} else {
		result = st.extraResult(r.key)
	}
	if r.servedFalse() {
		result = eval.Result{Key: result.Key, Reason: result.Reason, Condition: -1}
	}
	st.expose(result)
}

// exposeServed reports the exposures of a request whose response is known:
// the flags that decided something about it and, with events all, every flag
// the handler evaluated and passed to the backend.
func (st *requestState) exposeServed(routed []routedFlag) {
	for i := range routed {
		st.exposeRouted(&routed[i])
	}
	if !st.handler.app.eventsAll {
		return
	}
	for i := range st.results.Len() {
		if st.results.Reason(i).Inconclusive() {
			continue
		}
		result := st.results.At(i)
		if findRouted(routed, result.Key) == nil {
			st.expose(result)
		}
	}
}

// libVersion is flagsplit's module version, as built.
func libVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	if info.Main.Path == modulePath {
		return info.Main.Version
	}
	for _, dep := range info.Deps {
		if dep.Path == modulePath {
			if dep.Replace != nil && dep.Replace.Version != "" {
				return dep.Replace.Version
			}
			return dep.Version
		}
	}
	return "unknown"
}

const modulePath = "github.com/flagsplit/flagsplit"

func userAgent() string {
	return "flagsplit/" + libVersion() + " (caddy " + caddyVersion() + ")"
}

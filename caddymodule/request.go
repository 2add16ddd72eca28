package caddymodule

import (
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/proxy"
)

// stateVarKey is the request variable holding a request's flag state. It has no
// meaning as a placeholder; use {feature_flags.*} instead.
const stateVarKey = "feature_flags.request"

// placeholderPrefix starts every placeholder the handler provides.
const placeholderPrefix = "feature_flags."

// requestState is everything flagsplit knows about one request. It lives as
// long as the request (access logs read placeholders after the handler chain
// returns), so it is not pooled.
type requestState struct {
	handler *Handler
	// implicit: no feature_flags handler runs for the request (a matcher or
	// policy on a site without the directive evaluated it), so no response
	// is observed.
	implicit bool
	identity proxy.Identity
	cookie   *http.Cookie
	subject  eval.Subject
	// personInline holds the usual handful of person properties without an
	// allocation of their own.
	personInline [6]eval.Property
	bound        *boundSet
	results      eval.Results
	recorder     statusRecorder
	// headerScratch holds the upstream headers' values (a handful of
	// per-flag values, or the dictionary) without an allocation of their
	// own: the request's headers share it, and it lives as long as they do.
	headerScratch proxy.HeaderScratch

	mu sync.Mutex // guards the fields below: policies may run on retries
	// routed lists the flags a matcher or selection policy consulted; the
	// inline array holds the usual one or two without allocating.
	routed       []routedFlag
	routedInline [2]routedFlag
	// extra holds flags outside the handler's selection that a matcher,
	// policy or placeholder asked for.
	extra map[string]eval.Result
}

// routedFlag is a flag that decided something about the request.
type routedFlag struct {
	key     string
	value   string
	decided bool
	// index is the flag's position in the handler's selection, or -1 for a
	// flag outside it.
	index int
	// decision is how the selection policy routed the request (a matcher
	// leaves DecisionRoute: the value decided). DecisionFallback means the
	// value's upstream was unavailable and the default served the request;
	// DecisionNone that no upstream could.
	decision proxy.Decision
	// exposed: the exposure was reported (the implicit path reports it at
	// the decision, as it sees no response).
	exposed bool
}

// servedFalse reports whether the request was not served the flag's value:
// it fell back to the default upstream, which is what false is served, or no
// upstream could serve it.
func (r *routedFlag) servedFalse() bool {
	return r.decision == proxy.DecisionFallback || r.decision == proxy.DecisionNone
}

// served is the value the request was actually served.
func (r *routedFlag) served() string {
	if r.servedFalse() {
		return "false"
	}
	return r.value
}

// exposable reports whether the request exposed the user to a decided value.
func (r *routedFlag) exposable() bool { return r.decided && r.decision != proxy.DecisionNone }

// stateOf returns the state the handler attached to the request, or nil.
func stateOf(r *http.Request) *requestState {
	st, _ := caddyhttp.GetVar(r.Context(), stateVarKey).(*requestState)
	return st
}

// route returns a flag's value for this request and notes that the flag decides
// something about it (matchers and selection policies call it): from the
// handler's results when the flag is in its selection, otherwise evaluated on
// demand (and kept). decided is false for inconclusive and unknown flags.
func (st *requestState) route(key string) (value string, decided bool) {
	index := -1
	if i, selected := st.bound.index[key]; selected {
		index = i
		value, decided = st.results.Value(i), !st.results.Reason(i).Inconclusive()
	} else {
		r := st.extraResult(key)
		value, decided = r.Value(), !r.Inconclusive()
	}
	st.mu.Lock()
	if st.findRouted(key) == nil {
		if st.routed == nil {
			st.routed = st.routedInline[:0]
		}
		st.routed = append(st.routed, routedFlag{key: key, value: value, decided: decided, index: index})
	}
	st.mu.Unlock()
	return value, decided
}

// selected notes how the selection policy routed the request for a flag it
// asked route about; with retries the last attempt counts. A site without
// the feature_flags directive sees no response, so its exposure is reported
// here, once the policy has chosen.
func (st *requestState) selected(key string, decision proxy.Decision) {
	st.mu.Lock()
	r := st.findRouted(key)
	if r == nil {
		st.mu.Unlock()
		return
	}
	r.decision = decision
	expose := st.implicit && !r.exposed && r.exposable()
	r.exposed = r.exposed || expose
	rf := *r
	st.mu.Unlock()
	if expose {
		st.exposeRouted(&rf)
	}
}

// matched notes that a matcher decided on a flag. A site without the
// feature_flags directive sees no response, so its exposure is reported
// here.
func (st *requestState) matched(key string) {
	if !st.implicit {
		return
	}
	st.mu.Lock()
	r := st.findRouted(key)
	expose := r != nil && !r.exposed
	var rf routedFlag
	if expose {
		r.exposed = true
		rf = *r
	}
	st.mu.Unlock()
	if expose {
		st.exposeRouted(&rf)
	}
}

// findRouted returns the routed entry of key, or nil. Callers hold st.mu.
func (st *requestState) findRouted(key string) *routedFlag { return findRouted(st.routed, key) }

func (st *requestState) extraResult(key string) eval.Result {
	st.mu.Lock()
	defer st.mu.Unlock()
	if r, ok := st.extra[key]; ok {
		return r
	}
	r := st.bound.defs.Evaluate(key, &st.subject)
	if st.extra == nil {
		st.extra = map[string]eval.Result{}
	}
	st.extra[key] = r
	return r
}

// placeholder provides {feature_flags.*}.
func (st *requestState) placeholder(key string) (any, bool) {
	if !strings.HasPrefix(key, placeholderPrefix) {
		return nil, false
	}
	name := key[len(placeholderPrefix):]
	if name == "distinct_id" {
		return st.identity.DistinctID, true
	}
	if name == "bootstrap" {
		return st.bootstrap(), true
	}
	if i, ok := st.bound.index[name]; ok {
		return st.results.Value(i), true
	}
	if flag, ok := strings.CutSuffix(name, ".payload"); ok {
		var r eval.Result
		if i, ok := st.bound.index[flag]; ok {
			r = st.results.At(i)
		} else if _, defined := st.bound.defs.Flag(flag); defined {
			r = st.extraResult(flag)
		} else {
			return "", true
		}
		if r.Payload == nil {
			return "", true
		}
		return string(r.Payload.JSON), true
	}
	// A flag outside the selection is evaluated on demand; an unknown flag is
	// false, as everywhere else.
	return st.extraResult(name).Value(), true
}

// countEvaluations updates the evaluation and inconclusive counters and the
// flags' last-evaluated times.
func (st *requestState) countEvaluations() {
	now := st.handler.app.clock.Now().Unix()
	for _, c := range st.bound.lastSeen {
		touch(c, now)
	}
	for i := range st.bound.counters {
		c := &st.bound.counters[i]
		c.values[st.results.ValueIndex(i)].inc()
		if reason := st.results.Reason(i); reason.Inconclusive() {
			c.reasons[reason].inc()
		}
	}
}

// observe is the request's one exit: it records the outcome of the request
// for the flags that routed it (metrics, admin statistics), feeds the ramps of
// the flags being rolled out, and reports the exposures, each on the value the
// request was actually served: a request that fell back to the default
// upstream was served false, whatever its flag said.
func (st *requestState) observe(err error, elapsed time.Duration, repl *caddy.Replacer) {
	st.mu.Lock()
	routed := st.routed
	st.mu.Unlock()
	events := st.handler.app.events != nil
	if len(routed) == 0 && len(st.bound.rollouts) == 0 && !events {
		return
	}
	out := proxy.Outcome{Status: st.status(err), Duration: elapsed}
	failed := out.Failed()
	engine := st.handler.app.engine
	for _, br := range st.bound.rollouts {
		value := st.results.Value(br.index)
		if r := findRouted(routed, br.run.Flag()); r != nil {
			value = r.served()
		}
		br.run.Observe(value, failed, elapsed)
		if matchedByHash(st.results.Reason(br.index)) && st.identity.DistinctID != "" {
			br.run.ObserveUser(st.identity.DistinctID, value, br.share)
		}
	}
	if len(routed) > 0 {
		upstream, _ := repl.GetString("http.reverse_proxy.upstream.hostport")
		class := codeClassIndex(out.Status)
		for i := range routed {
			r := &routed[i]
			var m *valueMetrics
			if r.index >= 0 {
				vi := 0 // "false"
				if !r.servedFalse() {
					vi = st.results.ValueIndex(r.index)
				}
				m = &st.bound.metrics[r.index][vi]
			} else {
				m = newValueMetrics(r.key, r.served())
				if run := engine.rollouts.InForce().Run(r.key); run != nil {
					run.Observe(r.served(), failed, elapsed)
					if matchedByHash(st.extraResult(r.key).Reason) && st.identity.DistinctID != "" {
						run.ObserveUser(st.identity.DistinctID, r.served(), treatmentShare(st.bound.defs, r.key))
					}
				}
			}
			if r.servedFalse() {
				fallbacksTotal.WithLabelValues(r.key, r.value).Inc()
			}
			m.record(engine, upstream, class, out)
		}
	}
	if events {
		st.exposeServed(routed)
	}
}

func findRouted(routed []routedFlag, key string) *routedFlag {
	for i := range routed {
		if routed[i].key == key {
			return &routed[i]
		}
	}
	return nil
}

// status is the final status of the request: what the rest of the chain
// wrote, or the status of the error it returned (reverse_proxy reports
// upstream failures as errors: 502, 503, 504).
func (st *requestState) status(err error) int {
	status := st.recorder.status
	if err != nil {
		var he caddyhttp.HandlerError
		switch {
		case errors.As(err, &he) && he.StatusCode != 0 && status == 0:
			status = he.StatusCode
		case status == 0:
			status = http.StatusInternalServerError
		}
	} else if status == 0 {
		status = http.StatusOK
	}
	return status
}

// statusRecorder notes the status the rest of the chain wrote.
type statusRecorder struct {
	caddyhttp.ResponseWriterWrapper
	state  *requestState
	status int
}

// WriteHeader implements http.ResponseWriter. Informational responses other
// than a protocol switch are not the final status.
func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		s.status = code
	}
	s.ResponseWriterWrapper.WriteHeader(code)
}

// Write implements http.ResponseWriter.
func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriterWrapper.Write(b)
}

// flagCounters are one flag's metric series, resolved on first use so that no
// label lookup happens per request and no empty series are exported.
type flagCounters struct {
	values  []lazyCounter
	reasons []lazyCounter
}

type lazyCounter struct {
	once    sync.Once
	vec     *prometheus.CounterVec
	labels  [2]string
	counter prometheus.Counter
}

func (c *lazyCounter) inc() {
	c.once.Do(func() { c.counter = c.vec.WithLabelValues(c.labels[0], c.labels[1]) })
	c.counter.Inc()
}

func newFlagCounters(key string, values []string) flagCounters {
	fc := flagCounters{values: make([]lazyCounter, len(values)), reasons: make([]lazyCounter, len(eval.Reasons())+1)}
	for i, v := range values {
		fc.values[i].vec, fc.values[i].labels = evaluationsTotal, [2]string{key, v}
	}
	for _, reason := range eval.Reasons() {
		fc.reasons[reason].vec, fc.reasons[reason].labels = inconclusiveTotal, [2]string{key, reason.String()}
	}
	return fc
}

// valueMetrics are the series of one flag value for routed requests, resolved
// once: the duration histogram, the outcome counter, and a requests counter per
// (upstream, status class), kept in a copy-on-write list so the request path
// only reads.
type valueMetrics struct {
	flag, value string
	once        sync.Once
	duration    prometheus.Observer
	outcome     *proxy.VariantCounter
	requests    atomic.Pointer[[]upstreamCounter]
	mu          sync.Mutex // serialises additions to requests
}

type upstreamCounter struct {
	upstream string
	class    int
	counter  prometheus.Counter
}

func newValueMetrics(flag, value string) *valueMetrics {
	return &valueMetrics{flag: flag, value: value}
}

func (m *valueMetrics) record(e *engine, upstream string, class int, out proxy.Outcome) {
	m.once.Do(func() {
		m.duration = requestDuration.WithLabelValues(m.flag, m.value)
		m.outcome = e.outcomes.Counter(m.flag, m.value)
	})
	m.requestCounter(upstream, class).Inc()
	m.duration.Observe(out.Duration.Seconds())
	m.outcome.Record(out)
}

func (m *valueMetrics) requestCounter(upstream string, class int) prometheus.Counter {
	if list := m.requests.Load(); list != nil {
		for i := range *list {
			if c := &(*list)[i]; c.class == class && c.upstream == upstream {
				return c.counter
			}
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var next []upstreamCounter
	if list := m.requests.Load(); list != nil {
		for i := range *list {
			if c := &(*list)[i]; c.class == class && c.upstream == upstream {
				return c.counter
			}
		}
		next = append(next, *list...)
	}
	c := requestsTotal.WithLabelValues(m.flag, m.value, upstream, codeClasses[class])
	next = append(next, upstreamCounter{upstream: upstream, class: class, counter: c})
	m.requests.Store(&next)
	return c
}

var codeClasses = [...]string{"error", "1xx", "2xx", "3xx", "4xx", "5xx"}

// codeClassIndex indexes codeClasses.
func codeClassIndex(status int) int {
	if status >= 100 && status < 600 {
		return status / 100
	}
	return 0
}

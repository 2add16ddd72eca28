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
	handler  *Handler
	identity proxy.Identity
	cookie   *http.Cookie
	subject  eval.Subject
	// personInline holds the usual handful of person properties without an
	// allocation of their own.
	personInline [6]eval.Property
	bound        *boundSet
	results      eval.Results
	recorder     statusRecorder

	mu sync.Mutex // guards the fields below: policies may run on retries
	// routed lists the flags a matcher or selection policy consulted; the
	// inline array holds the usual one or two without allocating.
	routed       []routedFlag
	routedInline [2]routedFlag
	// extra holds flags outside the handler's selection that a matcher,
	// policy or placeholder asked for.
	extra map[string]eval.Result
}

type routedFlag struct {
	key     string
	value   string
	decided bool
	// metrics are the flag value's resolved series; nil for a flag outside
	// the handler's selection (resolved by name then).
	metrics *valueMetrics
}

// stateOf returns the state the handler attached to the request, or nil.
func stateOf(r *http.Request) *requestState {
	st, _ := caddyhttp.GetVar(r.Context(), stateVarKey).(*requestState)
	return st
}

// route returns a flag's value for this request and notes that the flag decides
// where the request goes (matchers and selection policies call it): from the
// handler's results when the flag is in its selection, otherwise evaluated on
// demand (and kept). decided is false for inconclusive and unknown flags.
func (st *requestState) route(key string) (value string, decided bool) {
	var metrics *valueMetrics
	i, selected := st.bound.index[key]
	var extra eval.Result
	if selected {
		value, decided = st.results.Value(i), !st.results.Reason(i).Inconclusive()
		metrics = &st.bound.metrics[i][st.results.ValueIndex(i)]
	} else {
		extra = st.extraResult(key)
		value, decided = extra.Value(), !extra.Inconclusive()
	}
	if st.markRouted(routedFlag{key: key, value: value, decided: decided, metrics: metrics}) && decided &&
		st.handler.app.events != nil {
		if selected {
			st.expose(st.results.At(i))
		} else {
			st.expose(extra)
		}
	}
	return value, decided
}

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

// markRouted notes that a flag decided where the request went, and reports
// whether this is the first time for this request.
func (st *requestState) markRouted(rf routedFlag) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	for _, r := range st.routed {
		if r.key == rf.key {
			return false
		}
	}
	if st.routed == nil {
		st.routed = st.routedInline[:0]
	}
	st.routed = append(st.routed, rf)
	return true
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
	now := time.Now().Unix()
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

// finish records the outcome of the request for the flags that routed it and
// feeds the ramps of the flags being rolled out.
func (st *requestState) finish(err error, elapsed time.Duration, repl *caddy.Replacer) {
	st.mu.Lock()
	routed := st.routed
	st.mu.Unlock()
	if len(routed) == 0 && len(st.bound.rollouts) == 0 {
		return
	}
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
	out := proxy.Outcome{Status: status, Duration: elapsed}
	for _, br := range st.bound.rollouts {
		// Inconclusive answers are "false" and were served the old side, so
		// they are control traffic like any other "false".
		br.run.observe(st.results.Value(br.index), out.Failed(), elapsed)
	}
	if len(routed) == 0 {
		return
	}
	upstream, _ := repl.GetString("http.reverse_proxy.upstream.hostport")
	class := codeClassIndex(status)
	engine := st.handler.app.engine
	for _, r := range routed {
		m := r.metrics
		if m == nil {
			m = newValueMetrics(r.key, r.value)
			if run := engine.rolloutRun(r.key); run != nil {
				run.observe(r.value, out.Failed(), elapsed)
			}
		}
		m.record(engine, upstream, class, out)
	}
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

package caddymodule

import (
	"errors"
	"net/http"
	"strings"
	"sync"
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
	bound    *boundSet
	results  eval.Results
	recorder statusRecorder

	mu sync.Mutex // guards the fields below: policies may run on retries
	// routed lists the flags a matcher or selection policy consulted.
	routed []routedFlag
	// extra holds flags outside the handler's selection that a matcher,
	// policy or placeholder asked for.
	extra map[string]eval.Result
}

type routedFlag struct {
	key     string
	value   string
	decided bool
}

// stateOf returns the state the handler attached to the request, or nil.
func stateOf(r *http.Request) *requestState {
	st, _ := caddyhttp.GetVar(r.Context(), stateVarKey).(*requestState)
	return st
}

// lookup returns a flag's value for this request: from the handler's results
// when the flag is in its selection, otherwise evaluated on demand (and kept).
// decided is false for inconclusive and unknown flags.
func (st *requestState) lookup(key string) (value string, decided bool) {
	if i, ok := st.bound.index[key]; ok {
		return st.results.Value(i), !st.results.Reason(i).Inconclusive()
	}
	r := st.extraResult(key)
	return r.Value(), !r.Inconclusive()
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

// markRouted notes that key decided where the request went.
func (st *requestState) markRouted(key, value string, decided bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	for _, r := range st.routed {
		if r.key == key {
			return
		}
	}
	st.routed = append(st.routed, routedFlag{key: key, value: value, decided: decided})
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

// finish records the outcome of the request for the flags that routed it.
func (st *requestState) finish(err error, elapsed time.Duration, repl *caddy.Replacer) {
	st.mu.Lock()
	routed := st.routed
	st.mu.Unlock()
	if len(routed) == 0 {
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
	upstream, _ := repl.GetString("http.reverse_proxy.upstream.hostport")
	class := proxy.CodeClass(status)
	for _, r := range routed {
		requestsTotal.WithLabelValues(r.key, r.value, upstream, class).Inc()
		requestDuration.WithLabelValues(r.key, r.value).Observe(elapsed.Seconds())
		st.handler.app.engine.outcomes.Record(r.key, r.value, proxy.Outcome{Status: status, Duration: elapsed})
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

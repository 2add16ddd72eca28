package proxy

import (
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// Outcome is what one request routed by a flag came back with.
type Outcome struct {
	// Status is the response status (from the response, or from the error the
	// proxy returned: 502 for a transport failure, 504 for a timeout).
	Status int
	// Duration is the time the rest of the handler chain took.
	Duration time.Duration
}

// Failed reports whether the outcome counts as an error: a 5xx or no response.
func (o Outcome) Failed() bool { return o.Status >= 500 || o.Status == 0 }

// CodeClass is the status class label: "1xx" .. "5xx", or "error" when there is
// no status.
func CodeClass(status int) string {
	switch {
	case status >= 100 && status < 200:
		return "1xx"
	case status < 300 && status >= 200:
		return "2xx"
	case status < 400 && status >= 300:
		return "3xx"
	case status < 500 && status >= 400:
		return "4xx"
	case status < 600 && status >= 500:
		return "5xx"
	}
	return "error"
}

// Outcomes counts requests, errors and latency per flag and variant. It is safe
// for concurrent use; recording takes no lock shared by all requests.
type Outcomes struct {
	m sync.Map // variantKey -> *variantCounts
}

type variantKey struct{ flag, variant string }

// VariantCounter holds one flag value's counts. Callers that record often keep
// it instead of looking it up by name each time.
type VariantCounter struct {
	requests atomic.Uint64
	errors   atomic.Uint64
	nanos    atomic.Uint64
}

// Record adds one request's outcome.
func (c *VariantCounter) Record(out Outcome) {
	c.requests.Add(1)
	if out.Failed() {
		c.errors.Add(1)
	}
	if out.Duration > 0 {
		c.nanos.Add(uint64(out.Duration))
	}
}

// Counter returns the counter for a flag value, creating it on first use.
func (o *Outcomes) Counter(flag, variant string) *VariantCounter {
	k := variantKey{flag, variant}
	v, ok := o.m.Load(k)
	if !ok {
		v, _ = o.m.LoadOrStore(k, &VariantCounter{})
	}
	return v.(*VariantCounter)
}

// Record adds one request's outcome for a flag value.
func (o *Outcomes) Record(flag, variant string, out Outcome) {
	o.Counter(flag, variant).Record(out)
}

// VariantStats are the counts for one flag value.
type VariantStats struct {
	Flag          string  `json:"flag"`
	Variant       string  `json:"variant"`
	Requests      uint64  `json:"requests"`
	Errors        uint64  `json:"errors"`
	MeanLatencyMS float64 `json:"mean_latency_ms"`
}

// Snapshot returns the counts, sorted by flag and variant.
func (o *Outcomes) Snapshot() []VariantStats {
	var out []VariantStats
	o.m.Range(func(key, value any) bool {
		k, c := key.(variantKey), value.(*VariantCounter)
		s := VariantStats{Flag: k.flag, Variant: k.variant, Requests: c.requests.Load(), Errors: c.errors.Load()}
		if s.Requests > 0 {
			s.MeanLatencyMS = float64(c.nanos.Load()) / float64(s.Requests) / 1e6
		}
		out = append(out, s)
		return true
	})
	sort.Slice(out, func(i, j int) bool {
		if out[i].Flag != out[j].Flag {
			return out[i].Flag < out[j].Flag
		}
		return out[i].Variant < out[j].Variant
	})
	return out
}

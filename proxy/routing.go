package proxy

import (
	"fmt"
	"net"
	"strings"
)

// Router maps a flag's value to an upstream: the routes of
// `lb_policy feature_flag <flag> { <value> <upstream> ...; default <upstream> }`.
type Router struct {
	routes map[string]string
	def    string
}

// NewRouter checks and normalises a value-to-upstream table. def is where
// everything else goes: values without a route, inconclusive and unknown flags,
// and routes whose upstream is unavailable.
func NewRouter(routes map[string]string, def string) (*Router, error) {
	if def == "" {
		return nil, fmt.Errorf("a default upstream is required")
	}
	r := &Router{routes: make(map[string]string, len(routes)), def: NormalizeUpstream(def)}
	for value, up := range routes {
		if value == "" || up == "" {
			return nil, fmt.Errorf("route %q -> %q: value and upstream are required", value, up)
		}
		r.routes[value] = NormalizeUpstream(up)
	}
	return r, nil
}

// Default is the default upstream.
func (r *Router) Default() string { return r.def }

// Route returns the upstream configured for value ("" when none).
func (r *Router) Route(value string) string { return r.routes[value] }

// NormalizeUpstream writes an upstream as reverse_proxy's dial address: the
// scheme is dropped (http implies port 80, https 443 when no port is given).
func NormalizeUpstream(addr string) string {
	addr = strings.TrimSpace(addr)
	defaultPort := ""
	switch {
	case strings.HasPrefix(addr, "http://"):
		addr, defaultPort = strings.TrimPrefix(addr, "http://"), "80"
	case strings.HasPrefix(addr, "https://"):
		addr, defaultPort = strings.TrimPrefix(addr, "https://"), "443"
	}
	addr = strings.TrimSuffix(addr, "/")
	if defaultPort != "" {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			addr = net.JoinHostPort(strings.Trim(addr, "[]"), defaultPort)
		}
	}
	return addr
}

// Pool is the upstream list a selection policy chooses from.
type Pool interface {
	Len() int
	Dial(i int) string
	Available(i int) bool
}

// Decision says how an upstream was chosen.
type Decision uint8

// Decisions.
const (
	// DecisionRoute: the value's route.
	DecisionRoute Decision = iota
	// DecisionDefault: no route for the value, or the flag was not decided.
	DecisionDefault
	// DecisionFallback: the value's upstream was unavailable; default instead.
	DecisionFallback
	// DecisionNone: nothing available (the default is down too).
	DecisionNone
)

var decisionNames = [...]string{"route", "default", "fallback", "none"}

func (d Decision) String() string {
	if int(d) < len(decisionNames) {
		return decisionNames[d]
	}
	return fmt.Sprintf("decision(%d)", uint8(d))
}

// Select picks the upstream for a flag value. decided is false when the flag was
// inconclusive, unknown or errored: such requests always go to the default. It
// returns the pool index, or -1 when the upstream it should use is unavailable.
func Select[P Pool](r *Router, pool P, value string, decided bool) (int, Decision) {
	if decided {
		if up, ok := r.routes[value]; ok {
			if i := find(pool, up); i >= 0 && pool.Available(i) {
				return i, DecisionRoute
			}
			if up == r.def {
				return -1, DecisionNone
			}
			if i := find(pool, r.def); i >= 0 && pool.Available(i) {
				return i, DecisionFallback
			}
			return -1, DecisionNone
		}
	}
	if i := find(pool, r.def); i >= 0 && pool.Available(i) {
		return i, DecisionDefault
	}
	return -1, DecisionNone
}

func find[P Pool](pool P, dial string) int {
	for i := 0; i < pool.Len(); i++ {
		if pool.Dial(i) == dial {
			return i
		}
	}
	return -1
}

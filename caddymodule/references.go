package caddymodule

import (
	"fmt"
	"slices"
	"strings"
	"sync"

	"go.uber.org/zap"

	"github.com/flagsplit/flagsplit/eval"
)

// flagReference is a place in the config that names a flag, with the values
// it tests or routes. A reference to a flag the definitions lack, or to a
// value the flag cannot take, is almost always a typo: it silently never
// matches, and its users all get the default.
type flagReference struct {
	flag string
	// values are the values the place expects the flag to take.
	values []string
	// where names the place, e.g. `lb_policy feature_flag` or `rollout`.
	where string
}

// referenceProblem is one reference the definitions do not satisfy.
type referenceProblem struct {
	ref flagReference
	// value is the value the flag lacks ("" when the flag itself is missing).
	value string
	msg   string
}

// checkReference returns what is wrong with ref against defs.
func checkReference(defs *eval.Definitions, ref flagReference) []referenceProblem {
	f, ok := defs.Flag(ref.flag)
	if !ok {
		msg := fmt.Sprintf("%s: the definitions have no flag %q", ref.where, ref.flag)
		keys := make([]string, 0, defs.Len())
		for _, f := range defs.Flags() {
			keys = append(keys, f.Key)
		}
		if near := closest(ref.flag, keys); near != "" {
			msg += fmt.Sprintf(" (did you mean %s?)", near)
		}
		return []referenceProblem{{ref: ref, msg: msg}}
	}
	known := append([]string{"true", "false"}, f.Variants()...)
	var out []referenceProblem
	for _, v := range ref.values {
		if slices.Contains(known, v) {
			continue
		}
		msg := fmt.Sprintf("%s: flag %q never has the value %q (it is %s)", ref.where, ref.flag, v, strings.Join(known, ", "))
		if near := closest(v, known); near != "" {
			msg += fmt.Sprintf("; did you mean %s?", near)
		}
		out = append(out, referenceProblem{ref: ref, value: v, msg: msg})
	}
	return out
}

// closest returns the candidate nearest to s by edit distance, when it is near
// enough to be a plausible typo of it (a few edits, or a key cut short or
// run on: "new-checkout" for "new-checkout-flow").
func closest(s string, candidates []string) string {
	best, bestDist := "", 0
	for _, c := range candidates {
		d := editDistance(s, c)
		if min(len(s), len(c)) >= 6 && (strings.HasPrefix(c, s) || strings.HasPrefix(s, c)) {
			d = min(d, 2)
		}
		if best == "" || d < bestDist {
			best, bestDist = c, d
		}
	}
	if best == "" || bestDist > max(2, len(s)/3) {
		return ""
	}
	return best
}

// editDistance is the Levenshtein distance between a and b, in bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// references are the flag references of one config, checked when they are
// made (so that `caddy validate` shows them), when the config starts, and
// whenever the definitions change. Each problem is logged once per config.
type references struct {
	mu       sync.Mutex
	refs     []flagReference
	reported map[string]bool
}

// reference records a reference made by a module of this config and checks
// it against the definitions in force, if any have been loaded yet.
func (a *App) reference(ref flagReference) {
	a.refs.mu.Lock()
	a.refs.refs = append(a.refs.refs, ref)
	a.refs.mu.Unlock()
	if a.engine.snapshot().ready {
		a.reportReferences(a.engine.definitions(), []flagReference{ref})
	}
}

// checkReferences checks every reference of the config against defs.
func (a *App) checkReferences(defs *eval.Definitions) {
	a.refs.mu.Lock()
	refs := slices.Clone(a.refs.refs)
	a.refs.mu.Unlock()
	a.reportReferences(defs, refs)
}

func (a *App) reportReferences(defs *eval.Definitions, refs []flagReference) {
	for _, ref := range refs {
		for _, p := range checkReference(defs, ref) {
			a.refs.mu.Lock()
			if a.refs.reported == nil {
				a.refs.reported = map[string]bool{}
			}
			seen := a.refs.reported[p.msg]
			a.refs.reported[p.msg] = true
			a.refs.mu.Unlock()
			if !seen {
				a.logger.Warn("the config refers to a flag or value the definitions do not have; it never matches",
					zap.String("flag", p.ref.flag), zap.String("where", p.ref.where), zap.String("problem", p.msg))
			}
		}
	}
}

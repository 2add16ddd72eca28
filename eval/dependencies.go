package eval

import (
	"encoding/json"
)

// compileDependency prepares a "type": "flag" filter; its chain is bound to
// flags by resolveDependencies once every flag is known.
func (c *compiler) compileDependency(flt *filter, obj rawObject, opName, path, flagKey string) {
	// A malformed dependency does not match (PostHog's SDKs warn and answer false).
	if opName != "flag_evaluates_to" || flt.key == "" || !flt.hasValue {
		flt.depMalformed = true
		c.warn(path, flagKey, "malformed flag dependency (needs key, operator flag_evaluates_to and a value); it never matches")
		return
	}
	switch flt.value.Kind() {
	case KindBool, KindString:
	default:
		flt.depMalformed = true
		c.warn(path+".value", flagKey, "flag dependency value must be a boolean or a variant key; it never matches")
		return
	}
	if isNull(obj["dependency_chain"]) {
		flt.depChainMissing = true
		c.warn(path+".dependency_chain", flagKey, "flag dependency without dependency_chain; cannot be evaluated locally")
		return
	}
	if err := json.Unmarshal(obj["dependency_chain"], &flt.depChainKeys); err != nil {
		flt.depChainMissing = true
		c.warn(path+".dependency_chain", flagKey, "dependency_chain is not a list of flag keys; cannot be evaluated locally")
		return
	}
	if len(flt.depChainKeys) == 0 {
		c.warn(path+".dependency_chain", flagKey, "empty dependency_chain marks a circular dependency; cannot be evaluated locally")
	}
	c.depFilters = append(c.depFilters, flt)
}

// resolveDependencies binds dependency chains to flags now that all are known.
func (c *compiler) resolveDependencies() {
	for _, flt := range c.depFilters {
		flt.depChain = make([]int, len(flt.depChainKeys))
		for i, k := range flt.depChainKeys {
			flt.depChain[i] = -1
			if dep, ok := c.defs.byKey[k]; ok {
				flt.depChain[i] = dep.index
			} else {
				c.warn(flt.path+".dependency_chain", "", "flag %q in the dependency chain is not defined; cannot be evaluated locally", k)
			}
		}
		flt.depTarget = -1
		if target, ok := c.defs.byKey[flt.key]; ok {
			flt.depTarget = target.index
		}
	}
	for _, f := range c.defs.flags {
		for _, cond := range f.conditions {
			for _, flt := range cond.filters {
				if flt.kind == filterFlag || (flt.kind == filterCohort && flt.cohort != nil && flt.cohort.hasDeps) {
					f.hasDeps = true
				}
			}
		}
	}
}

// references lists the flags a dependency filter evaluates: its chain and its
// target.
func (flt *filter) references() []int {
	if flt.kind != filterFlag || flt.depMalformed || flt.depChainMissing {
		return nil
	}
	refs := append([]int(nil), flt.depChain...)
	if flt.depTarget >= 0 {
		refs = append(refs, flt.depTarget)
	}
	return refs
}

// markClockUse finds flags whose answer can change with the wall clock, so
// cached answers for them are recomputed: flags with a date filter anywhere
// (relative dates move, and a partial date such as "2024" is completed from
// today), directly, inside cohorts, or through the flags they depend on.
func (c *compiler) markClockUse() {
	refs := make([][]int, len(c.defs.flags))
	for i, f := range c.defs.flags {
		f.forEachFilter(func(flt *filter) {
			if flt.usesClock() {
				f.usesClock = true
			}
			refs[i] = append(refs[i], flt.references()...)
		})
	}
	for changed := true; changed; {
		changed = false
		for i, f := range c.defs.flags {
			if f.usesClock {
				continue
			}
			for _, dep := range refs[i] {
				if dep >= 0 && c.defs.flags[dep].usesClock {
					f.usesClock, changed = true, true
					break
				}
			}
		}
	}
}

// markDependencyCycles finds flags that depend on themselves through other flags
// (PostHog's server sends such dependencies with an empty chain; malformed
// documents can still carry one) and marks the dependency filters on the cycle,
// so the answer is inconclusive whatever order flags are evaluated in.
func (c *compiler) markDependencyCycles() {
	n := len(c.defs.flags)
	adj := make([][]int, n)
	for i, f := range c.defs.flags {
		f.forEachFilter(func(flt *filter) {
			for _, dep := range flt.references() {
				if dep >= 0 {
					adj[i] = append(adj[i], dep)
				}
			}
		})
	}
	comp := stronglyConnected(adj)
	size := map[int]int{}
	for _, cID := range comp {
		size[cID]++
	}
	for i, f := range c.defs.flags {
		f.forEachFilter(func(flt *filter) {
			for _, dep := range flt.references() {
				if dep >= 0 && comp[dep] == comp[i] && (size[comp[i]] > 1 || dep == i) {
					flt.depCycle = true
				}
			}
		})
	}
}

// stronglyConnected labels the strongly connected components of a graph
// (Tarjan's algorithm, iterative so a long chain cannot exhaust the stack).
func stronglyConnected(adj [][]int) []int {
	n := len(adj)
	index, low, comp := make([]int, n), make([]int, n), make([]int, n)
	onStack := make([]bool, n)
	for i := range index {
		index[i], comp[i] = -1, -1
	}
	var stack []int
	next, nextComp := 0, 0
	type frame struct{ v, edge int }
	for root := 0; root < n; root++ {
		if index[root] >= 0 {
			continue
		}
		work := []frame{{root, 0}}
		index[root], low[root] = next, next
		next++
		stack = append(stack, root)
		onStack[root] = true
		for len(work) > 0 {
			top := &work[len(work)-1]
			v := top.v
			if top.edge < len(adj[v]) {
				w := adj[v][top.edge]
				top.edge++
				if index[w] < 0 {
					index[w], low[w] = next, next
					next++
					stack = append(stack, w)
					onStack[w] = true
					work = append(work, frame{w, 0})
				} else if onStack[w] && index[w] < low[v] {
					low[v] = index[w]
				}
				continue
			}
			if low[v] == index[v] {
				for {
					w := stack[len(stack)-1]
					stack = stack[:len(stack)-1]
					onStack[w] = false
					comp[w] = nextComp
					if w == v {
						break
					}
				}
				nextComp++
			}
			work = work[:len(work)-1]
			if len(work) > 0 {
				if u := work[len(work)-1].v; low[v] < low[u] {
					low[u] = low[v]
				}
			}
		}
	}
	return comp
}

package eval

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
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
	c.depFilters = append(c.depFilters, depFilter{flt, flagKey})
}

// resolveDependencies binds dependency chains to flags now that all are known.
func (c *compiler) resolveDependencies() {
	for _, df := range c.depFilters {
		flt := df.filter
		flt.depChain = make([]int, len(flt.depChainKeys))
		for i, k := range flt.depChainKeys {
			flt.depChain[i] = -1
			if dep, ok := c.defs.byKey[k]; ok {
				flt.depChain[i] = dep.index
			} else {
				c.warn(flt.path+".dependency_chain", df.flag, "flag %q in the dependency chain is not defined; cannot be evaluated locally", k)
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

// analyseDependencies works on the graph of flags that evaluating a flag
// evaluates (its dependency filters' chains and targets, its own and those of
// the cohorts it uses), taking flags in dependency order: a flag after every
// flag it depends on, except within a cycle. In one pass each, so that a long
// chain costs linear time, it
//   - marks the dependency filters on a cycle (PostHog's server sends such
//     dependencies with an empty chain; malformed documents can still carry
//     one), with the cycle's path, so the answer is inconclusive
//     (dependency_cycle) whatever order flags are evaluated in;
//   - marks flags whose dependencies nest deeper than MaxDependencyDepth as
//     malformed, which bounds how deep any evaluation recurses;
//   - finds the flags whose answer can change with the wall clock, so cached
//     answers for them are recomputed: flags with a date filter anywhere
//     (relative dates move, and a partial date such as "2024" is completed
//     from today), directly, inside cohorts, or through their dependencies;
//   - finds the dependency filters that can never be decided because a flag
//     they evaluate is missing or can never be decided itself, transitively.
func (c *compiler) analyseDependencies() {
	flags := c.defs.flags
	n := len(flags)
	adj := make([][]int, n)
	for i, f := range flags {
		f.forEachFilter(func(flt *filter) {
			for _, dep := range flt.references() {
				if dep >= 0 {
					adj[i] = append(adj[i], dep)
				}
			}
		})
	}
	comp := stronglyConnected(adj)
	size := make([]int, n)
	for _, cID := range comp {
		size[cID]++
	}
	// Tarjan's algorithm numbers components sinks first: ordering flags by
	// component puts every flag after the flags it depends on.
	order := make([]int, n)
	start := make([]int, n+1)
	for _, cID := range comp {
		start[cID+1]++
	}
	for k := 1; k <= n; k++ {
		start[k] += start[k-1]
	}
	pos := append([]int(nil), start[:n]...)
	for i, cID := range comp {
		order[pos[cID]] = i
		pos[cID]++
	}
	cyclic := func(i, dep int) bool { return comp[dep] == comp[i] && (size[comp[i]] > 1 || dep == i) }
	paths := cyclePaths{flags: flags, adj: adj, comp: comp}

	depth := make([]int, n)
	deepest := make([]int, n)  // the dependency a flag's depth comes through, -1 for none
	never := make([]string, n) // why a flag evaluated as a dependency is always inconclusive
	for _, i := range order {
		f := flags[i]
		deepest[i] = -1
		cycleWarned := false
		f.forEachFilter(func(flt *filter) {
			if flt.usesClock() {
				f.usesClock = true
			}
			refs := flt.references()
			for _, dep := range refs {
				if dep >= 0 && cyclic(i, dep) {
					flt.depCycle = true
					if flt.depCyclePath == "" {
						flt.depCyclePath = paths.through(i, dep)
					}
				}
			}
			if flt.depCycle {
				// Evaluation stops at the cycle: nothing beyond is reached.
				if !cycleWarned {
					cycleWarned = true
					c.warn(flt.path, f.Key, "flag dependency cycle %s; the filter is inconclusive (%s) and cannot be evaluated locally",
						flt.depCyclePath, ReasonDependencyCycle)
				}
				return
			}
			for _, dep := range refs {
				if dep < 0 {
					continue
				}
				if flags[dep].usesClock {
					f.usesClock = true
				}
				if depth[dep]+1 > depth[i] {
					depth[i], deepest[i] = depth[dep]+1, dep
				}
				if flt.depUndecided == "" && never[dep] != "" {
					flt.depUndecided = fmt.Sprintf("depends on flag %q, which can never be evaluated locally", flags[dep].Key)
					c.warn(flt.path, f.Key, "%s; the filter is inconclusive", flt.depUndecided)
				}
			}
			if flt.depUndecided == "" && flt.kind == filterFlag && !flt.depMalformed && !flt.depChainMissing {
				for k, dep := range flt.depChain {
					if dep < 0 {
						flt.depUndecided = fmt.Sprintf("depends on flag %q, which is not defined", flt.depChainKeys[k])
						break
					}
				}
				if flt.depUndecided == "" && flt.depTarget < 0 {
					flt.depUndecided = fmt.Sprintf("depends on flag %q, which is not defined", flt.key)
				}
			}
		})
		if depth[i] > MaxDependencyDepth && f.broken == "" {
			f.broken = fmt.Sprintf("flag dependencies nest deeper than the limit of %d (%s)", MaxDependencyDepth, chainText(flags, deepest, i))
			c.problem("$.flags["+strconv.Itoa(i)+"]", f.Key, "%s", f.broken)
		}
		never[i] = f.undecidedAsDependency()
	}
}

// chainText shows the deepest dependency chain from flag i, shortened.
func chainText(flags []*Flag, deepest []int, i int) string {
	var keys []string
	for k := i; k >= 0 && len(keys) < 6; k = deepest[k] {
		keys = append(keys, flags[k].Key)
	}
	return strings.Join(keys, " -> ") + " -> ..."
}

// cyclePaths finds, for a dependency edge on a cycle, a path of flag keys
// around it. Per component it keeps one breadth-first tree each way from a
// root, built on first use, so every edge's path costs at most the size of its
// component: the path from the edge's end to the root, then on to its start.
type cyclePaths struct {
	flags []*Flag
	adj   [][]int
	comp  []int
	trees map[int]*cycleTree
}

type cycleTree struct {
	root int
	// to[v] is the next flag from v on a shortest path to root; from[v] the
	// flag before v on a shortest path from root.
	to, from map[int]int
}

// maxCycleKeys bounds the flag keys shown in a cycle's path.
const maxCycleKeys = 12

func (p *cyclePaths) through(i, dep int) string {
	if i == dep {
		return p.flags[i].Key + " -> " + p.flags[i].Key
	}
	t := p.tree(i)
	walk := []int{i}
	for v := dep; v != t.root; v = t.to[v] {
		walk = append(walk, v)
	}
	walk = append(walk, t.root)
	var back []int
	for v := i; v != t.root; v = t.from[v] {
		back = append(back, v)
	}
	for k := len(back) - 1; k >= 0; k-- {
		walk = append(walk, back[k])
	}
	// A walk through the root may pass i twice; cut it at the first return.
	for k := 1; k < len(walk); k++ {
		if walk[k] == i {
			walk = walk[:k+1]
			break
		}
	}
	keys := make([]string, 0, min(len(walk), maxCycleKeys+2))
	for k, v := range walk {
		if k == maxCycleKeys && len(walk) > maxCycleKeys+1 {
			keys = append(keys, fmt.Sprintf("... (%d more)", len(walk)-maxCycleKeys-1))
			keys = append(keys, p.flags[walk[len(walk)-1]].Key)
			break
		}
		keys = append(keys, p.flags[v].Key)
	}
	return strings.Join(keys, " -> ")
}

func (p *cyclePaths) tree(i int) *cycleTree {
	cID := p.comp[i]
	if t, ok := p.trees[cID]; ok {
		return t
	}
	if p.trees == nil {
		p.trees = map[int]*cycleTree{}
	}
	t := &cycleTree{root: i, to: map[int]int{}, from: map[int]int{}}
	// Edges reversed, within the component, for the paths to the root.
	rev := map[int][]int{}
	members := []int{i}
	seen := map[int]bool{i: true}
	for k := 0; k < len(members); k++ {
		v := members[k]
		for _, w := range p.adj[v] {
			if p.comp[w] != cID {
				continue
			}
			rev[w] = append(rev[w], v)
			if !seen[w] {
				seen[w] = true
				t.from[w] = v
				members = append(members, w)
			}
		}
	}
	queue := []int{i}
	reached := map[int]bool{i: true}
	for k := 0; k < len(queue); k++ {
		v := queue[k]
		for _, u := range rev[v] {
			if !reached[u] {
				reached[u] = true
				t.to[u] = v
				queue = append(queue, u)
			}
		}
	}
	p.trees[cID] = t
	return t
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

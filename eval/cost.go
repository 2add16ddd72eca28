package eval

// estimateCost guesses what evaluating the flag takes, from what it does: a
// hash per rollout gate and variant table, and per filter its operator's
// typical cost (measured with this package's benchmarks). Cohort and dependency
// filters count what they reach.
func (f *Flag) estimateCost() int {
	hash := 90
	if hasFastSHA1 {
		hash = 45
	}
	cost := 20
	if len(f.variants) > 0 {
		cost += hash
	}
	for _, cond := range f.conditions {
		cost += 5
		if cond.hasRollout && cond.rollout < 1 {
			cost += hash
		}
	}
	f.forEachFilter(func(flt *filter) {
		switch flt.kind {
		case filterCohort:
			cost += 30
		case filterFlag:
			cost += 20 + 60*len(flt.depChain)
		default:
			switch flt.op {
			case opRegex, opNotRegex:
				cost += 120
				if flt.re.state == regexBacktrack {
					cost += backtrackingRegexCost
				}
			case opDateBefore, opDateAfter:
				cost += 70
			case opSemverEq, opSemverNeq, opSemverGT, opSemverGTE, opSemverLT, opSemverLTE,
				opSemverTilde, opSemverCaret, opSemverWildcard:
				cost += 35
			default:
				cost += 20
			}
		}
	})
	return cost
}

// backtrackingRegexCost is what a regex filter on the backtracking engine
// adds to a flag's cost estimate (ns): BenchmarkLookaroundRegexFilter less
// BenchmarkRE2RegexFilter is about 150 ns on a 20-character value, and the
// engine's cost grows faster with the value than RE2's.
const backtrackingRegexCost = 200

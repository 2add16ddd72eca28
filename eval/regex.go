package eval

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/dlclark/regexp2"
)

// Regex filters follow posthog-python, which calls
// re.compile(str(value)).search(str(property)) without flags, and answers
// false for both regex and not_regex when re.compile raises re.error.
//
// A pattern is first parsed as Python 3.11's re parses it (pyregex.go): that
// decides validity, and gives python's meaning to what the two engines below
// spell differently (\d, \w and \s are python's Unicode classes, "$" also
// matches before a final newline, \Z is the end of the string, {,n} is a
// repetition, verbose mode, and so on). The parsed pattern is then written
// out for one of two engines:
//
//   - RE2 (Go's regexp) whenever it can express the pattern: linear time,
//     and the hot path of every ordinary pattern, unchanged.
//   - Otherwise regexp2 (v1, a port of .NET's backtracking engine: its v2's
//     new optimiser answered wrongly on patterns such as a?.+ and (?>x+){2}),
//     for look-arounds, back-references, conditionals, atomic groups,
//     possessive repeats and repetition counts over RE2's 1000, with a
//     match-time limit: a match that exceeds it is inconclusive
//     (ReasonRegexTimeout) rather than a stalled request.
//
// A pattern RE2 runs may still send some values elsewhere, where RE2's
// meaning differs from python's (see regexGuard): to the backtracking engine
// with "$" (not multi-line) a value ending in a newline, with \b or \B
// outside ASCII mode a value with a non-ASCII character, with \B the empty
// value; to a second RE2 program with python's full Unicode \d, \w and \s
// (the main one holds their ASCII members, as fast as RE2's own) a value with
// a non-ASCII character.
//
// Residual differences from python's re, all outside what PostHog users
// write: case-insensitive matching ((?i)) uses the engines' Unicode simple
// case folding, which differs from python's lower-case comparison for a few
// characters (U+0130 İ matches "i" in python only); in ASCII mode ((?a)) with
// (?i), a back-reference still compares with Unicode folding; a group name
// is checked with Go's Unicode tables (python's isidentifier uses Unicode
// 14.0 XID properties); a repetition count above 2**31-2 is treated as
// unbounded (or, as a minimum, as unmatchable by any value); \N{...} needs
// Unicode's name table and is inconclusive.

// RegexMatchTimeout bounds one match of the backtracking engine. A routing
// decision must not wait on a pattern's exponential backtracking: ordinary
// look-around patterns match PostHog-sized values in microseconds, so a few
// milliseconds separate them clearly from a runaway match while costing a
// request little when one happens. A match that runs out of time is retried
// once (a goroutine descheduled mid-match must not look like a runaway), so
// the worst case is about twice this plus regexClockPeriod each time.
const RegexMatchTimeout = 5 * time.Millisecond

// regexClockPeriod is how often regexp2's timeout clock ticks. Its default of
// 100 ms would let a 5 ms limit run to 200 ms; the clock only runs while
// matches with a deadline are live (and a second after), so ticking every
// millisecond costs a sleeping goroutine's wake-ups, not a core.
const regexClockPeriod = time.Millisecond

func init() {
	// regexp2 requires this before any match with a deadline starts; package
	// initialisation runs before any request can.
	regexp2.SetTimeoutCheckPeriod(regexClockPeriod)
}

// regexState is how a regex filter is evaluated.
type regexState uint8

const (
	// regexInvalid: python's re rejects the pattern; regex and not_regex are
	// both false.
	regexInvalid regexState = iota
	// regexRE2: RE2 answers, for some values with its second program or
	// the backtracking engine (see regexGuard).
	regexRE2
	// regexBacktrack: the backtracking engine answers for every value.
	regexBacktrack
	// regexUnsupported: posthog-python cannot evaluate the pattern locally
	// (re.compile raises something other than re.error), or the \N{...}
	// names it uses need Unicode's name table; the filter is inconclusive.
	regexUnsupported
)

// regexGuard names the values an RE2 pattern's main program must not answer,
// because RE2's meaning differs from python's on them.
type regexGuard uint8

const (
	// guardFinalNewline: "$" matches before a final "\n" too; the
	// backtracking engine answers values ending in one.
	guardFinalNewline regexGuard = 1 << iota
	// guardEmptyValue: \B never matches the empty string; the backtracking
	// engine answers it.
	guardEmptyValue
	// guardUnicodeBoundary: python's \b and \B use Unicode word characters,
	// RE2's ASCII ones; the backtracking engine answers non-ASCII values.
	guardUnicodeBoundary
	// guardUnicodeClasses: the main program spells \d, \w and \s (and
	// their negations) as their ASCII members, which is exact and fast on
	// ASCII values; a second RE2 program with python's full Unicode classes
	// answers non-ASCII values.
	guardUnicodeClasses
)

// compiledRegex is a regex filter value, compiled once.
type compiledRegex struct {
	state regexState
	guard regexGuard
	// re2 is RE2's program; re2Unicode its twin with full Unicode classes
	// (guardUnicodeClasses only).
	re2, re2Unicode *regexp.Regexp
	// bt is the backtracking engine's program: the whole answer for
	// regexBacktrack, the guarded values' for regexRE2.
	bt *regexp2.Regexp
	// minWidth is the fewest characters a match needs. Python's matcher
	// fails a shorter value at once; the backtracking engine checks it first
	// too, or a pattern like (a*?){1001}x would spend its whole time limit on
	// a value that can never match.
	minWidth uint64
}

// compileRegex compiles a filter's pattern; why explains the state for
// warnings.
func compileRegex(pattern string) (cr compiledRegex, why string) {
	pat, err := parsePyRegex(pattern)
	switch {
	case errors.Is(err, errPyUnsupported):
		return compiledRegex{state: regexUnsupported}, "posthog-python cannot evaluate it locally"
	case err != nil:
		return compiledRegex{state: regexInvalid}, "python's re rejects it"
	}
	cr.minWidth = pat.minWidth
	text, feat := writeRegex(pat, dialectRE2, true)
	if !feat.backtrack {
		if re, err := regexp.Compile(text); err == nil {
			cr.state, cr.re2, cr.guard = regexRE2, re, feat.guard
			if feat.guard&guardUnicodeClasses != 0 {
				full, _ := writeRegex(pat, dialectRE2, false)
				if cr.re2Unicode, err = regexp.Compile(full); err != nil {
					// Only a size limit can refuse the larger classes.
					cr.guard &^= guardUnicodeClasses
					cr.guard |= guardUnicodeBoundary
				}
			}
			if feat.guard&^guardUnicodeClasses != 0 || cr.re2Unicode == nil && cr.guard != 0 {
				cr.bt, _ = compileBacktracking(pat)
			}
			return cr, ""
		}
	}
	if cr.bt, err = compileBacktracking(pat); err != nil {
		return compiledRegex{state: regexUnsupported}, "neither engine can run it: " + err.Error()
	}
	cr.state = regexBacktrack
	return cr, ""
}

func compileBacktracking(pat *pyPattern) (*regexp2.Regexp, error) {
	text, _ := writeRegex(pat, dialectNET, false)
	re, err := regexp2.Compile(text, regexp2.None)
	if err != nil {
		return nil, fmt.Errorf("backtracking engine: %w", err)
	}
	re.MatchTimeout = RegexMatchTimeout
	return re, nil
}

// re2For returns the RE2 program that answers s, nil when the backtracking
// engine must (or the pattern is not RE2's). The common case, an RE2
// pattern without guards, is one comparison.
func (cr *compiledRegex) re2For(s string) *regexp.Regexp {
	if cr.guard == 0 {
		return cr.re2
	}
	return cr.guardedRE2For(s)
}

func (cr *compiledRegex) guardedRE2For(s string) *regexp.Regexp {
	g := cr.guard
	if g&guardFinalNewline != 0 && len(s) > 0 && s[len(s)-1] == '\n' {
		return nil
	}
	if g&guardEmptyValue != 0 && s == "" {
		return nil
	}
	if g&(guardUnicodeBoundary|guardUnicodeClasses) != 0 && !isASCIIString(s) {
		if g&guardUnicodeBoundary != 0 {
			return nil
		}
		return cr.re2Unicode
	}
	return cr.re2
}

func isASCIIString(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

// match runs python's re.search. A non-zero reason says the answer cannot be
// had: the backtracking engine ran out of time, or the pattern is not
// supported.
func (cr *compiledRegex) match(s string) (matched bool, reason Reason) {
	switch cr.state {
	case regexInvalid:
		return false, 0
	case regexUnsupported:
		return false, ReasonInvalidValue
	case regexRE2:
		if re := cr.re2For(s); re != nil {
			return re.MatchString(s), 0
		}
		if cr.bt == nil {
			return false, ReasonInvalidValue
		}
	}
	return cr.backtrack(s)
}

func (cr *compiledRegex) backtrack(s string) (bool, Reason) {
	if cr.minWidth > 0 && (uint64(len(s)) < cr.minWidth || uint64(utf8.RuneCountInString(s)) < cr.minWidth) {
		return false, 0
	}
	// regexp2's only error is a timeout.
	for attempt := 0; attempt < 2; attempt++ {
		if m, err := cr.bt.MatchString(s); err == nil {
			return m, 0
		}
	}
	return false, ReasonRegexTimeout
}

// ---------------------------------------------------------------------------
// Writing a parsed pattern for an engine.

type regexDialect uint8

const (
	dialectRE2 regexDialect = iota // Go's regexp/syntax
	dialectNET                     // regexp2's default (.NET) syntax
)

// regexFeatures is what writing found out about the pattern.
type regexFeatures struct {
	backtrack bool // RE2 cannot express it
	guard     regexGuard
}

type regexWriter struct {
	d    regexDialect
	b    []byte
	feat regexFeatures
	// asciiClasses writes Unicode-mode \d, \w and \s as their ASCII members
	// (and records guardUnicodeClasses).
	asciiClasses bool
}

// netMaxCount is the largest repetition count regexp2 accepts safely.
const netMaxCount = 1<<31 - 2

func writeRegex(pat *pyPattern, d regexDialect, asciiClasses bool) (string, regexFeatures) {
	w := &regexWriter{d: d, asciiClasses: asciiClasses}
	w.seq(pat.nodes, pat.flags)
	return string(w.b), w.feat
}

func combineFlags(flags, add, del pyFlags) pyFlags {
	if add&pyTypeFlags != 0 {
		flags &^= pyTypeFlags
	}
	return (flags | add) &^ del
}

func (w *regexWriter) seq(nodes []*reNode, fl pyFlags) {
	for _, n := range nodes {
		w.node(n, fl)
	}
}

func (w *regexWriter) str(s string) { w.b = append(w.b, s...) }

func (w *regexWriter) node(n *reNode, fl pyFlags) {
	ascii := fl&pyASCII != 0
	icase := fl&pyIgnoreCase != 0
	switch n.kind {
	case reLiteral:
		switch {
		case icase && ascii && isASCIILetterRune(n.r):
			w.str("[")
			w.classChar(n.r | 0x20)
			w.classChar(n.r &^ 0x20)
			w.str("]")
		case icase && !ascii:
			w.str("(?i:")
			w.literal(n.r)
			w.str(")")
		default:
			w.literal(n.r)
		}
	case reNotLiteral:
		w.set([]reSetItem{{lo: n.r, hi: n.r}}, true, fl)
	case reSet:
		w.set(n.items, n.neg, fl)
	case reAny:
		if fl&pyDotAll != 0 {
			w.str("(?s:.)")
		} else {
			w.str(`[^\n]`)
		}
	case reAt:
		w.at(n.at, fl)
	case reRepeat:
		w.repeat(n, fl)
	case reGroup:
		inner := combineFlags(fl, n.add, n.del)
		if n.group > 0 {
			w.str("(")
		} else {
			w.str("(?:")
		}
		w.seq(n.sub, inner)
		w.str(")")
	case reBranch:
		w.str("(?:")
		for i, alt := range n.alts {
			if i > 0 {
				w.str("|")
			}
			w.seq(alt, fl)
		}
		w.str(")")
	case reAssert:
		w.feat.backtrack = true
		switch {
		case n.behind && n.neg:
			w.str("(?<!")
		case n.behind:
			w.str("(?<=")
		case n.neg:
			w.str("(?!")
		default:
			w.str("(?=")
		}
		w.seq(n.sub, fl)
		w.str(")")
	case reAtomic:
		w.feat.backtrack = true
		w.str("(?>")
		w.seq(n.sub, fl)
		w.str(")")
	case reRef:
		w.feat.backtrack = true
		if icase {
			w.str("(?i:")
		}
		w.str(`\k<` + strconv.Itoa(n.group) + `>`)
		if icase {
			w.str(")")
		}
	case reCond:
		w.feat.backtrack = true
		w.str("(?(" + strconv.Itoa(n.group) + ")(?:")
		w.seq(n.sub, fl)
		w.str(")|(?:")
		w.seq(n.no, fl)
		w.str("))")
	}
}

func (w *regexWriter) repeat(n *reNode, fl pyFlags) {
	lo, hi := n.min, n.max
	unbounded := hi == pyMaxRepeat
	if w.d == dialectNET {
		if lo > netMaxCount {
			// More repetitions than any value has characters (unless the
			// body can match nothing, where fewer match the same).
			if bl, _ := widthOf(n.sub); bl > 0 {
				w.str("(?!)")
				return
			}
			lo = netMaxCount
		}
		if !unbounded && hi > netMaxCount {
			unbounded = true
		}
	}
	if n.mode == repeatPossessive {
		w.feat.backtrack = true
		w.str("(?>")
	}
	w.str("(?:")
	w.seq(n.sub, fl)
	w.str(")")
	switch {
	case lo == 0 && unbounded:
		w.str("*")
	case lo == 1 && unbounded:
		w.str("+")
	case lo == 0 && hi == 1:
		w.str("?")
	case unbounded:
		w.str("{" + strconv.FormatUint(lo, 10) + ",}")
	case lo == hi:
		w.str("{" + strconv.FormatUint(lo, 10) + "}")
	default:
		w.str("{" + strconv.FormatUint(lo, 10) + "," + strconv.FormatUint(hi, 10) + "}")
	}
	if n.mode == repeatLazy {
		w.str("?")
	}
	if n.mode == repeatPossessive {
		w.str(")")
	}
}

// widthOf is the least width of a sequence, for repeat clamping.
func widthOf(nodes []*reNode) (uint64, uint64) {
	p := &pyParser{}
	return p.widthNoRefs(nodes)
}

// widthNoRefs is width without group widths (a back-reference counts as
// possibly empty).
func (p *pyParser) widthNoRefs(nodes []*reNode) (uint64, uint64) {
	var lo, hi uint64
	for _, n := range nodes {
		var l, h uint64
		switch n.kind {
		case reLiteral, reNotLiteral, reSet, reAny:
			l, h = 1, 1
		case reGroup, reAtomic:
			l, h = p.widthNoRefs(n.sub)
		case reRepeat:
			bl, bh := p.widthNoRefs(n.sub)
			l, h = satMul(bl, n.min), satMul(bh, n.max)
		case reBranch:
			l = pyMaxWidth
			for _, alt := range n.alts {
				al, ah := p.widthNoRefs(alt)
				l, h = min(l, al), max(h, ah)
			}
		case reRef, reCond:
			l, h = 0, pyMaxWidth
		}
		lo, hi = satAdd(lo, l), satAdd(hi, h)
	}
	return lo, hi
}

func (w *regexWriter) at(at reAtKind, fl pyFlags) {
	multiline := fl&pyMultiline != 0
	switch at {
	case atBeginning:
		if multiline {
			w.str("(?m:^)")
		} else {
			w.str(`\A`)
		}
	case atBeginningString:
		w.str(`\A`)
	case atEnd:
		switch {
		case multiline:
			w.str("(?m:$)")
		case w.d == dialectRE2:
			w.str(`\z`)
			w.feat.guard |= guardFinalNewline
		default:
			w.str(`(?=\n?\z)`)
		}
	case atEndString:
		w.str(`\z`)
	case atBoundary, atNonBoundary:
		ascii := fl&pyASCII != 0
		if w.d == dialectRE2 {
			if at == atBoundary {
				w.str(`\b`)
			} else {
				w.str(`\B`)
				w.feat.guard |= guardEmptyValue
			}
			if !ascii {
				w.feat.guard |= guardUnicodeBoundary
			}
			return
		}
		word := w.categoryClass(catWord, ascii)
		if at == atBoundary {
			w.str("(?:(?<=" + word + ")(?!" + word + ")|(?<!" + word + ")(?=" + word + "))")
		} else {
			w.str(`(?!\A\z)(?:(?<=` + word + ")(?=" + word + ")|(?<!" + word + ")(?!" + word + "))")
		}
	}
}

// categoryClass writes a category as a bracketed class.
func (w *regexWriter) categoryClass(cat reCategory, ascii bool) string {
	sub := &regexWriter{d: w.d}
	sub.str("[")
	for _, r := range w.categoryRanges(cat, ascii) {
		sub.classRange(r.lo, r.hi)
	}
	sub.str("]")
	return string(sub.b)
}

var (
	asciiDigit = []pyRange{{'0', '9'}}
	asciiSpace = []pyRange{{'\t', '\r'}, {' ', ' '}}
	asciiWord  = []pyRange{{'0', '9'}, {'A', 'Z'}, {'_', '_'}, {'a', 'z'}}

	pyNotDigit    = complementRanges(pyDecimal)
	pyNotSpace    = complementRanges(pySpace)
	pyNotWord     = complementRanges(pyWord)
	asciiNotDigit = complementRanges(asciiDigit)
	asciiNotSpace = complementRanges(asciiSpace)
	asciiNotWord  = complementRanges(asciiWord)

	// Python's Unicode classes on ASCII values: \s also holds \v and
	// \x1c-\x1f there, unlike RE2's.
	pyASCIIDigit    = asciiMembers(pyDecimal)
	pyASCIINotDigit = asciiComplement(pyDecimal)
	pyASCIISpace    = asciiMembers(pySpace)
	pyASCIINotSpace = asciiComplement(pySpace)
	pyASCIIWord     = asciiMembers(pyWord)
	pyASCIINotWord  = asciiComplement(pyWord)
)

func complementRanges(t []pyRange) []pyRange {
	var out []pyRange
	next := rune(0)
	for _, r := range t {
		if r.lo > next {
			out = append(out, pyRange{next, r.lo - 1})
		}
		next = r.hi + 1
	}
	if next <= utf8.MaxRune {
		out = append(out, pyRange{next, utf8.MaxRune})
	}
	return out
}

// categoryRanges is a category's members: python's ASCII ones under (?a),
// its Unicode ones otherwise, or with asciiClasses the Unicode ones' ASCII
// members.
func (w *regexWriter) categoryRanges(cat reCategory, ascii bool) []pyRange {
	switch {
	case ascii:
		return [...][]pyRange{asciiDigit, asciiNotDigit, asciiSpace, asciiNotSpace, asciiWord, asciiNotWord}[cat]
	case w.asciiClasses:
		w.feat.guard |= guardUnicodeClasses
		return [...][]pyRange{pyASCIIDigit, pyASCIINotDigit, pyASCIISpace, pyASCIINotSpace, pyASCIIWord, pyASCIINotWord}[cat]
	}
	return [...][]pyRange{pyDecimal, pyNotDigit, pySpace, pyNotSpace, pyWord, pyNotWord}[cat]
}

// asciiMembers is the part of t below 0x80.
func asciiMembers(t []pyRange) []pyRange {
	var out []pyRange
	for _, r := range t {
		if r.lo >= utf8.RuneSelf {
			break
		}
		out = append(out, pyRange{r.lo, min(r.hi, utf8.RuneSelf-1)})
	}
	return out
}

// asciiComplement is the complement of t within ASCII.
func asciiComplement(t []pyRange) []pyRange {
	return asciiMembers(complementRanges(asciiMembers(t)))
}

func (w *regexWriter) set(items []reSetItem, neg bool, fl pyFlags) {
	ascii := fl&pyASCII != 0
	icase := fl&pyIgnoreCase != 0
	if icase && !ascii {
		w.str("(?i:")
	}
	w.str("[")
	if neg {
		w.str("^")
	}
	for _, it := range items {
		if it.isCat {
			for _, r := range w.categoryRanges(it.cat, ascii) {
				w.classRange(r.lo, r.hi)
			}
			continue
		}
		w.classRange(it.lo, it.hi)
		if icase && ascii {
			// python's ASCII case folding: the other case of the letters.
			for _, span := range [][2]rune{{'a', 'z'}, {'A', 'Z'}} {
				lo, hi := max(it.lo, span[0]), min(it.hi, span[1])
				if lo <= hi {
					w.classRange(lo^0x20, hi^0x20)
				}
			}
		}
	}
	w.str("]")
	if icase && !ascii {
		w.str(")")
	}
}

func (w *regexWriter) classRange(lo, hi rune) {
	w.classChar(lo)
	if hi != lo {
		w.str("-")
		w.classChar(hi)
	}
}

func isASCIIAlnum(r rune) bool { return isASCIIDigit(r) || isASCIILetterRune(r) }

// literal writes r outside a class: letters and digits as themselves,
// other ASCII escaped by code, the rest (never special in either syntax) as
// itself.
func (w *regexWriter) literal(r rune) {
	switch {
	case isASCIIAlnum(r):
		w.b = append(w.b, byte(r))
	case r < utf8.RuneSelf:
		w.hexChar(r)
	case r >= 0xD800 && r <= 0xDFFF:
		// A lone surrogate (from \uD800): no Go string holds one.
		w.hexChar(r)
	default:
		w.b = utf8.AppendRune(w.b, r)
	}
}

func (w *regexWriter) classChar(r rune) { w.literal(r) }

func (w *regexWriter) hexChar(r rune) {
	if w.d == dialectRE2 {
		w.str(`\x{` + strconv.FormatInt(int64(r), 16) + `}`)
		return
	}
	if r < 0x100 {
		w.str(fmt.Sprintf(`\x%02x`, r))
		return
	}
	w.str(fmt.Sprintf(`\u%04x`, r))
}

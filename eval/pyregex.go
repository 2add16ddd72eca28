package eval

import (
	"errors"
	"strconv"
	"unicode"
)

// This file reads regular expressions the way Python 3.11's re module does
// (re/_parser.py, plus the checks of re/_compiler.py), so that a pattern is
// invalid exactly when posthog-python's is_valid_regex says so, and means
// what python's re.search makes of it. The parsed pattern is then written out
// for RE2 (Go's regexp) when RE2 can express it, and for the backtracking
// engine (regexp2, .NET syntax) otherwise; see regex.go.

// errPyInvalid is python's re.error: posthog-python's is_valid_regex is
// false, so regex and not_regex are both false.
var errPyInvalid = errors.New("python's re rejects the pattern")

// errPyUnsupported is a pattern posthog-python cannot or we cannot judge:
// re.compile raises something other than re.error (OverflowError for a
// repetition count of 2**32-1 or more, ValueError for incompatible global
// flags, RecursionError for very deep nesting), which posthog-python reports
// as inconclusive; or a \N{...} name, which needs Unicode's name table.
var errPyUnsupported = errors.New("posthog-python cannot evaluate the pattern locally")

// pyFlags are python's inline flags.
type pyFlags uint16

const (
	pyIgnoreCase pyFlags = 1 << iota // i
	pyLocale                         // L
	pyMultiline                      // m
	pyDotAll                         // s
	pyVerbose                        // x
	pyASCII                          // a
	pyTemplate                       // t
	pyUnicode                        // u

	pyTypeFlags   = pyASCII | pyLocale | pyUnicode
	pyGlobalFlags = pyTemplate
)

func pyFlag(c rune) (pyFlags, bool) {
	switch c {
	case 'i':
		return pyIgnoreCase, true
	case 'L':
		return pyLocale, true
	case 'm':
		return pyMultiline, true
	case 's':
		return pyDotAll, true
	case 'x':
		return pyVerbose, true
	case 'a':
		return pyASCII, true
	case 't':
		return pyTemplate, true
	case 'u':
		return pyUnicode, true
	}
	return 0, false
}

const (
	// pyMaxRepeat is _sre.MAXREPEAT: a count of this or more raises
	// OverflowError; as a maximum it means "unbounded".
	pyMaxRepeat = 1<<32 - 1
	// pyMaxCode is the compiler's MAXCODE (4-byte code words): the longest
	// look-behind.
	pyMaxCode = 1<<32 - 1
	// pyMaxGroups is _sre.MAXGROUPS on 64-bit builds.
	pyMaxGroups = 1<<30 - 1
	// pyMaxWidth stands for the compiler's MAXWIDTH (1 << 64): widths
	// saturate there. Anything above pyMaxCode behaves the same.
	pyMaxWidth = 1 << 62
	// pyMaxNesting is how deep groups nest before python's parser (two
	// stack frames per group) raises RecursionError under posthog-python's
	// call stack: measured with posthog-python 7.42.0 on Python 3.11, 491
	// nested groups evaluate and 492 are inconclusive. Conditionals cost one
	// frame, groups two; the budget is in frames.
	pyMaxNesting = 2 * 491
)

type reKind uint8

const (
	reLiteral    reKind = iota // r
	reNotLiteral               // any character but r
	reSet                      // items, neg
	reAny                      // .
	reAt                       // at
	reRepeat                   // sub{min,max}, mode
	reGroup                    // capturing (group > 0) or flag-scoped group around sub
	reBranch                   // alts
	reAssert                   // look-ahead or look-behind (behind) around sub, neg
	reAtomic                   // (?>sub)
	reRef                      // back-reference to group
	reCond                     // (?(group)sub|no)
)

type reAtKind uint8

const (
	atBeginning       reAtKind = iota // ^
	atBeginningString                 // \A
	atEnd                             // $
	atEndString                       // \Z
	atBoundary                        // \b
	atNonBoundary                     // \B
)

type reRepeatMode uint8

const (
	repeatGreedy reRepeatMode = iota
	repeatLazy
	repeatPossessive
)

type reCategory uint8

const (
	catDigit reCategory = iota
	catNotDigit
	catSpace
	catNotSpace
	catWord
	catNotWord
)

// reSetItem is one member of a character set: a literal or range (lo..hi),
// or a category.
type reSetItem struct {
	lo, hi rune
	isCat  bool
	cat    reCategory
}

// reNode is one element of a parsed pattern, as in python's SubPattern.
type reNode struct {
	kind     reKind
	r        rune
	items    []reSetItem
	neg      bool
	at       reAtKind
	min, max uint64
	mode     reRepeatMode
	sub      []*reNode
	alts     [][]*reNode
	no       []*reNode
	hasNo    bool
	group    int // capture group (reGroup, reRef, reCond), 0 for none
	add, del pyFlags
	behind   bool
}

// pyPattern is a parsed pattern.
type pyPattern struct {
	nodes  []*reNode
	flags  pyFlags // global flags
	groups int     // capture groups
	// minWidth is the fewest characters a match takes (getwidth's lo).
	minWidth uint64
}

// pyToken is one token of python's Tokenizer: a character, or a backslash
// and the character after it.
type pyToken struct {
	ch  rune
	esc bool
	eof bool
}

func (t pyToken) is(c rune) bool { return !t.eof && !t.esc && t.ch == c }

func (t pyToken) text() string {
	if t.esc {
		return "\\" + string(t.ch)
	}
	return string(t.ch)
}

type pyTokenizer struct {
	s     []rune
	index int
	next  pyToken
	err   error
}

func (tz *pyTokenizer) advance() {
	if tz.index >= len(tz.s) {
		tz.next = pyToken{eof: true}
		return
	}
	c := tz.s[tz.index]
	if c == '\\' {
		if tz.index+1 >= len(tz.s) {
			// "bad escape (end of pattern)"
			tz.err = errPyInvalid
			tz.next = pyToken{eof: true}
			tz.index = len(tz.s)
			return
		}
		tz.next = pyToken{ch: tz.s[tz.index+1], esc: true}
		tz.index += 2
		return
	}
	tz.next = pyToken{ch: c}
	tz.index++
}

func (tz *pyTokenizer) match(c rune) bool {
	if tz.next.is(c) {
		tz.advance()
		return true
	}
	return false
}

func (tz *pyTokenizer) get() pyToken {
	t := tz.next
	tz.advance()
	return t
}

// tell is the index of the next token.
func (tz *pyTokenizer) tell() int {
	switch {
	case tz.next.eof:
		return tz.index
	case tz.next.esc:
		return tz.index - 2
	}
	return tz.index - 1
}

func (tz *pyTokenizer) seek(i int) {
	tz.index = i
	tz.advance()
}

// getwhile takes up to n single characters from set.
func (tz *pyTokenizer) getwhile(n int, set func(rune) bool) []rune {
	var out []rune
	for k := 0; k < n; k++ {
		if tz.next.eof || tz.next.esc || !set(tz.next.ch) {
			break
		}
		out = append(out, tz.next.ch)
		tz.advance()
	}
	return out
}

// getuntil reads a name up to terminator (the terminator is consumed).
func (tz *pyTokenizer) getuntil(terminator rune) (string, error) {
	var out []rune
	for {
		t := tz.get()
		if t.eof {
			return "", errPyInvalid // missing name / unterminated name
		}
		if t.is(terminator) {
			if len(out) == 0 {
				return "", errPyInvalid // missing group name
			}
			return string(out), nil
		}
		if t.esc {
			out = append(out, '\\')
		}
		out = append(out, t.ch)
	}
}

type pyGroupWidth struct {
	lo, hi uint64
	closed bool
}

type pyParser struct {
	tz               pyTokenizer
	flags            pyFlags
	groupNames       map[string]int
	widths           []pyGroupWidth // index = group number; 0 unused
	lookbehindGroups int            // -1 outside look-behinds
	condRefs         []int          // numeric conditional references, checked at the end
	frames           int            // parser recursion, against pyMaxNesting
	globalFlagsSeen  bool           // the group just parsed set global flags
}

// parsePyRegex parses pattern as python's re.compile would, returning
// errPyInvalid or errPyUnsupported when it would raise.
func parsePyRegex(pattern string) (*pyPattern, error) {
	p := &pyParser{widths: []pyGroupWidth{{}}, lookbehindGroups: -1}
	p.tz.s = []rune(pattern)
	p.tz.advance()
	nodes, err := p.parseSub(false, 0)
	if p.tz.err != nil {
		// python raises on a trailing backslash as soon as it reads it,
		// before anything parsed after that point could fail.
		return nil, errPyInvalid
	}
	if err != nil {
		return nil, err
	}
	// fix_flags: ASCII and UNICODE together raise ValueError.
	if p.flags&pyASCII != 0 && p.flags&pyUnicode != 0 {
		return nil, errPyUnsupported
	}
	if !p.tz.next.eof {
		return nil, errPyInvalid // unbalanced parenthesis
	}
	for _, g := range p.condRefs {
		if g >= len(p.widths) {
			return nil, errPyInvalid // invalid group reference
		}
	}
	minWidth, _ := p.width(nodes)
	pat := &pyPattern{nodes: nodes, flags: p.flags, groups: len(p.widths) - 1, minWidth: minWidth}
	// The compiler's checks: fixed-width look-behinds, no repeats under the
	// template flag.
	if err := p.checkCompile(nodes, p.flags); err != nil {
		return nil, err
	}
	return pat, nil
}

func (p *pyParser) enter(cost int) error {
	p.frames += cost
	if p.frames > pyMaxNesting {
		return errPyUnsupported
	}
	return nil
}

func (p *pyParser) leave(cost int) { p.frames -= cost }

func (p *pyParser) checkGroup(gid int) bool {
	return gid < len(p.widths) && p.widths[gid].closed
}

func (p *pyParser) checkLookbehindGroup(gid int) error {
	if p.lookbehindGroups >= 0 {
		if !p.checkGroup(gid) {
			return errPyInvalid // cannot refer to an open group
		}
		if gid >= p.lookbehindGroups {
			return errPyInvalid // cannot refer to group defined in the same lookbehind subpattern
		}
	}
	return nil
}

// parseSub is _parse_sub: alternatives separated by "|".
func (p *pyParser) parseSub(verbose bool, nested int) ([]*reNode, error) {
	var items [][]*reNode
	for {
		item, err := p.parse(verbose, nested+1, nested == 0 && len(items) == 0)
		if err != nil {
			return nil, err
		}
		items = append(items, item)
		if !p.tz.match('|') {
			break
		}
		if nested == 0 {
			verbose = p.flags&pyVerbose != 0
		}
	}
	if len(items) == 1 {
		return items[0], nil
	}
	return []*reNode{{kind: reBranch, alts: items}}, nil
}

func isPyWhitespace(c rune) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'
}

func isASCIIDigit(c rune) bool { return c >= '0' && c <= '9' }
func isOctDigit(c rune) bool   { return c >= '0' && c <= '7' }
func isHexDigit(c rune) bool {
	return isASCIIDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}
func isASCIILetterRune(c rune) bool { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') }

// parse is _parse: one alternative.
func (p *pyParser) parse(verbose bool, nested int, first bool) ([]*reNode, error) {
	var sub []*reNode
	tz := &p.tz
	for {
		if tz.err != nil {
			return nil, tz.err
		}
		this := tz.next
		if this.eof || this.is('|') || this.is(')') {
			break
		}
		tz.get()
		if tz.err != nil {
			return nil, tz.err
		}
		if verbose && !this.esc {
			if isPyWhitespace(this.ch) {
				continue
			}
			if this.ch == '#' {
				for {
					t := tz.get()
					if t.eof || t.is('\n') {
						break
					}
				}
				continue
			}
		}
		if this.esc {
			n, err := p.escape(this)
			if err != nil {
				return nil, err
			}
			sub = append(sub, n)
			continue
		}
		switch c := this.ch; c {
		case '[':
			n, err := p.set()
			if err != nil {
				return nil, err
			}
			sub = append(sub, n)
		case '*', '+', '?', '{':
			here := tz.tell()
			var lo, hi uint64
			switch c {
			case '?':
				lo, hi = 0, 1
			case '*':
				lo, hi = 0, pyMaxRepeat
			case '+':
				lo, hi = 1, pyMaxRepeat
			case '{':
				if tz.next.is('}') {
					sub = append(sub, &reNode{kind: reLiteral, r: '{'})
					continue
				}
				lo, hi = 0, pyMaxRepeat
				var los, his []rune
				for !tz.next.eof && !tz.next.esc && isASCIIDigit(tz.next.ch) {
					los = append(los, tz.get().ch)
				}
				if tz.match(',') {
					for !tz.next.eof && !tz.next.esc && isASCIIDigit(tz.next.ch) {
						his = append(his, tz.get().ch)
					}
				} else {
					his = los
				}
				if !tz.match('}') {
					sub = append(sub, &reNode{kind: reLiteral, r: '{'})
					tz.seek(here)
					continue
				}
				if len(los) > 0 {
					v, err := pyRepeatCount(los)
					if err != nil {
						return nil, err
					}
					lo = v
				}
				if len(his) > 0 {
					v, err := pyRepeatCount(his)
					if err != nil {
						return nil, err
					}
					hi = v
					if hi < lo {
						return nil, errPyInvalid // min repeat greater than max repeat
					}
				}
			}
			if len(sub) == 0 || sub[len(sub)-1].kind == reAt {
				return nil, errPyInvalid // nothing to repeat
			}
			last := sub[len(sub)-1]
			if last.kind == reRepeat {
				return nil, errPyInvalid // multiple repeat
			}
			body := []*reNode{last}
			if last.kind == reGroup && last.group == 0 && last.add == 0 && last.del == 0 {
				body = last.sub
			}
			mode := repeatGreedy
			if tz.match('?') {
				mode = repeatLazy
			} else if tz.match('+') {
				mode = repeatPossessive
			}
			sub[len(sub)-1] = &reNode{kind: reRepeat, min: lo, max: hi, mode: mode, sub: body}
		case '.':
			sub = append(sub, &reNode{kind: reAny})
		case '(':
			n, skip, err := p.group(verbose, nested, first, len(sub) == 0)
			if err != nil {
				return nil, err
			}
			if skip {
				if n == nil && p.globalFlagsSeen {
					// After global flags python re-reads the verbose flag.
					verbose = p.flags&pyVerbose != 0
					p.globalFlagsSeen = false
				}
				continue
			}
			sub = append(sub, n)
		case '^':
			sub = append(sub, &reNode{kind: reAt, at: atBeginning})
		case '$':
			sub = append(sub, &reNode{kind: reAt, at: atEnd})
		default:
			sub = append(sub, &reNode{kind: reLiteral, r: c})
		}
	}
	// Unpack non-capturing groups without flags, as python does.
	out := sub[:0:0]
	for _, n := range sub {
		if n.kind == reGroup && n.group == 0 && n.add == 0 && n.del == 0 {
			out = append(out, n.sub...)
			continue
		}
		out = append(out, n)
	}
	return out, nil
}

// pyRepeatCount is int() of a repetition count and the OverflowError check.
func pyRepeatCount(digits []rune) (uint64, error) {
	if len(digits) > maxIntDigits {
		return 0, errPyUnsupported // ValueError from int()
	}
	var v uint64
	for _, d := range digits {
		v = v*10 + uint64(d-'0')
		if v >= pyMaxRepeat {
			return 0, errPyUnsupported // OverflowError: the repetition number is too large
		}
	}
	return v, nil
}

// group parses what follows "(". skip is true for constructs that add
// nothing: comments and global flags.
func (p *pyParser) group(verbose bool, nested int, first, empty bool) (n *reNode, skip bool, err error) {
	tz := &p.tz
	capture := true
	atomic := false
	name := ""
	var add, del pyFlags
	if tz.match('?') {
		t := tz.get()
		if t.eof {
			return nil, false, errPyInvalid // unexpected end of pattern
		}
		switch {
		case t.is('P'):
			switch {
			case tz.match('<'):
				if name, err = tz.getuntil('>'); err != nil {
					return nil, false, err
				}
				if !isPyIdentifier(name) {
					return nil, false, errPyInvalid // bad character in group name
				}
			case tz.match('='):
				ref, err := tz.getuntil(')')
				if err != nil {
					return nil, false, err
				}
				if !isPyIdentifier(ref) {
					return nil, false, errPyInvalid
				}
				gid, ok := p.groupNames[ref]
				if !ok {
					return nil, false, errPyInvalid // unknown group name
				}
				if !p.checkGroup(gid) {
					return nil, false, errPyInvalid // cannot refer to an open group
				}
				if err := p.checkLookbehindGroup(gid); err != nil {
					return nil, false, err
				}
				return &reNode{kind: reRef, group: gid}, false, nil
			default:
				// unexpected end of pattern / unknown extension ?P
				return nil, false, errPyInvalid
			}
		case t.is(':'):
			capture = false
		case t.is('#'):
			for {
				if tz.next.eof {
					return nil, false, errPyInvalid // missing ), unterminated comment
				}
				if tz.get().is(')') {
					break
				}
			}
			return nil, true, nil
		case t.is('=') || t.is('!') || t.is('<'):
			behind := false
			c := t
			if t.is('<') {
				c = tz.get()
				if c.eof || !(c.is('=') || c.is('!')) {
					return nil, false, errPyInvalid // unknown extension ?<x
				}
				behind = true
			}
			outer := p.lookbehindGroups
			if behind && outer < 0 {
				p.lookbehindGroups = len(p.widths)
			}
			if err := p.enter(2); err != nil {
				return nil, false, err
			}
			body, err := p.parseSub(verbose, nested+1)
			p.leave(2)
			if err != nil {
				return nil, false, err
			}
			if behind && outer < 0 {
				p.lookbehindGroups = -1
			}
			if !tz.match(')') {
				return nil, false, errPyInvalid // missing ), unterminated subpattern
			}
			return &reNode{kind: reAssert, sub: body, neg: c.is('!'), behind: behind}, false, nil
		case t.is('('):
			return p.conditional(verbose, nested)
		case t.is('>'):
			capture, atomic = false, true
		case !t.esc && (t.ch == '-' || isFlagChar(t.ch)):
			global, a, d, err := p.inlineFlags(t.ch)
			if err != nil {
				return nil, false, err
			}
			if global {
				if !first || !empty {
					return nil, false, errPyInvalid // global flags not at the start of the expression
				}
				p.globalFlagsSeen = true
				return nil, true, nil
			}
			add, del, capture = a, d, false
		default:
			return nil, false, errPyInvalid // unknown extension
		}
	}
	gid := 0
	if capture {
		gid = len(p.widths)
		if gid > pyMaxGroups {
			return nil, false, errPyInvalid
		}
		if name != "" {
			if p.groupNames == nil {
				p.groupNames = map[string]int{}
			}
			if _, dup := p.groupNames[name]; dup {
				return nil, false, errPyInvalid // redefinition of group name
			}
			p.groupNames[name] = gid
		}
		p.widths = append(p.widths, pyGroupWidth{})
	}
	subVerbose := (verbose || add&pyVerbose != 0) && del&pyVerbose == 0
	if err := p.enter(2); err != nil {
		return nil, false, err
	}
	body, err := p.parseSub(subVerbose, nested+1)
	p.leave(2)
	if err != nil {
		return nil, false, err
	}
	if !tz.match(')') {
		return nil, false, errPyInvalid // missing ), unterminated subpattern
	}
	if gid > 0 {
		lo, hi := p.width(body)
		p.widths[gid] = pyGroupWidth{lo: lo, hi: hi, closed: true}
	}
	if atomic {
		return &reNode{kind: reAtomic, sub: body}, false, nil
	}
	return &reNode{kind: reGroup, group: gid, add: add, del: del, sub: body}, false, nil
}

func isFlagChar(c rune) bool {
	_, ok := pyFlag(c)
	return ok
}

// conditional parses (?(group)yes|no) after "(?(".
func (p *pyParser) conditional(verbose bool, nested int) (*reNode, bool, error) {
	tz := &p.tz
	condname, err := tz.getuntil(')')
	if err != nil {
		return nil, false, err
	}
	var gid int
	if isPyIdentifier(condname) {
		g, ok := p.groupNames[condname]
		if !ok {
			return nil, false, errPyInvalid // unknown group name
		}
		gid = g
	} else {
		v, ok := pyInt(condname)
		if !ok || v < 0 {
			return nil, false, errPyInvalid // bad character in group name
		}
		if v == 0 {
			return nil, false, errPyInvalid // bad group number
		}
		if v >= pyMaxGroups {
			return nil, false, errPyInvalid // invalid group reference
		}
		gid = int(v)
		p.condRefs = append(p.condRefs, gid)
	}
	if err := p.checkLookbehindGroup(gid); err != nil {
		return nil, false, err
	}
	if err := p.enter(1); err != nil {
		return nil, false, err
	}
	defer p.leave(1)
	yes, err := p.parse(verbose, nested+1, false)
	if err != nil {
		return nil, false, err
	}
	n := &reNode{kind: reCond, group: gid, sub: yes}
	if tz.match('|') {
		if n.no, err = p.parse(verbose, nested+1, false); err != nil {
			return nil, false, err
		}
		n.hasNo = true
		if tz.next.is('|') {
			return nil, false, errPyInvalid // conditional backref with more than two branches
		}
	}
	if !tz.match(')') {
		return nil, false, errPyInvalid // missing ), unterminated subpattern
	}
	return n, false, nil
}

// inlineFlags is _parse_flags, after "(?" and its first character.
func (p *pyParser) inlineFlags(c rune) (global bool, add, del pyFlags, err error) {
	tz := &p.tz
	if c != '-' {
		for {
			f, _ := pyFlag(c)
			if c == 'L' {
				return false, 0, 0, errPyInvalid // cannot use 'L' flag with a str pattern
			}
			add |= f
			if f&pyTypeFlags != 0 && add&pyTypeFlags != f {
				return false, 0, 0, errPyInvalid // flags 'a', 'u' and 'L' are incompatible
			}
			t := tz.get()
			if t.eof {
				return false, 0, 0, errPyInvalid // missing -, : or )
			}
			if t.is(')') || t.is('-') || t.is(':') {
				c = t.ch
				break
			}
			if t.esc || !isFlagChar(t.ch) {
				return false, 0, 0, errPyInvalid // unknown flag / missing -, : or )
			}
			c = t.ch
		}
	}
	if c == ')' {
		p.flags |= add
		return true, 0, 0, nil
	}
	if add&pyGlobalFlags != 0 {
		return false, 0, 0, errPyInvalid // cannot turn on global flag
	}
	if c == '-' {
		t := tz.get()
		if t.eof || t.esc || !isFlagChar(t.ch) {
			return false, 0, 0, errPyInvalid // missing flag / unknown flag
		}
		c = t.ch
		for {
			f, _ := pyFlag(c)
			if f&pyTypeFlags != 0 {
				return false, 0, 0, errPyInvalid // cannot turn off flags 'a', 'u' and 'L'
			}
			del |= f
			t := tz.get()
			if t.eof {
				return false, 0, 0, errPyInvalid // missing :
			}
			if t.is(':') {
				break
			}
			if t.esc || !isFlagChar(t.ch) {
				return false, 0, 0, errPyInvalid
			}
			c = t.ch
		}
	}
	if del&pyGlobalFlags != 0 {
		return false, 0, 0, errPyInvalid // cannot turn off global flag
	}
	if add&del != 0 {
		return false, 0, 0, errPyInvalid // flag turned on and off
	}
	return false, add, del, nil
}

// set parses a character set after "[".
func (p *pyParser) set() (*reNode, error) {
	tz := &p.tz
	var items []reSetItem
	neg := tz.match('^')
	for {
		this := tz.get()
		if tz.err != nil {
			return nil, tz.err
		}
		if this.eof {
			return nil, errPyInvalid // unterminated character set
		}
		if this.is(']') && len(items) > 0 {
			break
		}
		var code1 reSetItem
		if this.esc {
			it, err := p.classEscape(this)
			if err != nil {
				return nil, err
			}
			code1 = it
		} else {
			code1 = reSetItem{lo: this.ch, hi: this.ch}
		}
		if tz.match('-') {
			that := tz.get()
			if tz.err != nil {
				return nil, tz.err
			}
			if that.eof {
				return nil, errPyInvalid // unterminated character set
			}
			if that.is(']') {
				items = append(items, code1, reSetItem{lo: '-', hi: '-'})
				break
			}
			var code2 reSetItem
			if that.esc {
				it, err := p.classEscape(that)
				if err != nil {
					return nil, err
				}
				code2 = it
			} else {
				code2 = reSetItem{lo: that.ch, hi: that.ch}
			}
			if code1.isCat || code2.isCat || code1.lo != code1.hi || code2.lo != code2.hi {
				return nil, errPyInvalid // bad character range
			}
			if code2.lo < code1.lo {
				return nil, errPyInvalid // bad character range
			}
			items = append(items, reSetItem{lo: code1.lo, hi: code2.lo})
		} else {
			items = append(items, code1)
		}
	}
	if len(items) == 1 && !items[0].isCat && items[0].lo == items[0].hi {
		if neg {
			return &reNode{kind: reNotLiteral, r: items[0].lo}, nil
		}
		return &reNode{kind: reLiteral, r: items[0].lo}, nil
	}
	return &reNode{kind: reSet, items: items, neg: neg}, nil
}

func categoryOf(c rune) (reCategory, bool) {
	switch c {
	case 'd':
		return catDigit, true
	case 'D':
		return catNotDigit, true
	case 's':
		return catSpace, true
	case 'S':
		return catNotSpace, true
	case 'w':
		return catWord, true
	case 'W':
		return catNotWord, true
	}
	return 0, false
}

func simpleEscape(c rune) (rune, bool) {
	switch c {
	case 'a':
		return '\a', true
	case 'f':
		return '\f', true
	case 'n':
		return '\n', true
	case 'r':
		return '\r', true
	case 't':
		return '\t', true
	case 'v':
		return '\v', true
	case '\\':
		return '\\', true
	}
	return 0, false
}

// hexEscape reads the digits of \x (2), \u (4) or \U (8).
func (p *pyParser) hexEscape(c rune) (rune, error) {
	n := map[rune]int{'x': 2, 'u': 4, 'U': 8}[c]
	digits := p.tz.getwhile(n, isHexDigit)
	if len(digits) != n {
		return 0, errPyInvalid // incomplete escape
	}
	v, _ := strconv.ParseUint(string(digits), 16, 32)
	if v > unicode.MaxRune {
		return 0, errPyInvalid // chr() raises ValueError: bad escape
	}
	return rune(v), nil
}

// namedEscape is \N{...}: well-formed names need Unicode's name table.
func (p *pyParser) namedEscape() error {
	if !p.tz.match('{') {
		return errPyInvalid // missing {
	}
	if _, err := p.tz.getuntil('}'); err != nil {
		return err
	}
	return errPyUnsupported
}

// classEscape is _class_escape.
func (p *pyParser) classEscape(t pyToken) (reSetItem, error) {
	c := t.ch
	if r, ok := simpleEscape(c); ok {
		return reSetItem{lo: r, hi: r}, nil
	}
	if c == 'b' {
		return reSetItem{lo: '\b', hi: '\b'}, nil
	}
	if cat, ok := categoryOf(c); ok {
		return reSetItem{isCat: true, cat: cat}, nil
	}
	switch {
	case c == 'x' || c == 'u' || c == 'U':
		r, err := p.hexEscape(c)
		return reSetItem{lo: r, hi: r}, err
	case c == 'N':
		return reSetItem{}, p.namedEscape()
	case isOctDigit(c):
		digits := append([]rune{c}, p.tz.getwhile(2, isOctDigit)...)
		v, _ := strconv.ParseUint(string(digits), 8, 32)
		if v > 0o377 {
			return reSetItem{}, errPyInvalid // octal escape value outside of range
		}
		return reSetItem{lo: rune(v), hi: rune(v)}, nil
	case isASCIIDigit(c), isASCIILetterRune(c):
		return reSetItem{}, errPyInvalid // bad escape
	}
	return reSetItem{lo: c, hi: c}, nil
}

// escape is _escape (outside sets).
func (p *pyParser) escape(t pyToken) (*reNode, error) {
	c := t.ch
	switch c {
	case 'A':
		return &reNode{kind: reAt, at: atBeginningString}, nil
	case 'b':
		return &reNode{kind: reAt, at: atBoundary}, nil
	case 'B':
		return &reNode{kind: reAt, at: atNonBoundary}, nil
	case 'Z':
		return &reNode{kind: reAt, at: atEndString}, nil
	}
	if cat, ok := categoryOf(c); ok {
		return &reNode{kind: reSet, items: []reSetItem{{isCat: true, cat: cat}}}, nil
	}
	if r, ok := simpleEscape(c); ok {
		return &reNode{kind: reLiteral, r: r}, nil
	}
	tz := &p.tz
	switch {
	case c == 'x' || c == 'u' || c == 'U':
		r, err := p.hexEscape(c)
		return &reNode{kind: reLiteral, r: r}, err
	case c == 'N':
		return nil, p.namedEscape()
	case c == '0':
		digits := append([]rune{c}, tz.getwhile(2, isOctDigit)...)
		v, _ := strconv.ParseUint(string(digits), 8, 32)
		return &reNode{kind: reLiteral, r: rune(v)}, nil
	case isASCIIDigit(c):
		// Octal escape or group reference.
		digits := []rune{c}
		if !tz.next.eof && !tz.next.esc && isASCIIDigit(tz.next.ch) {
			digits = append(digits, tz.get().ch)
			if isOctDigit(digits[0]) && isOctDigit(digits[1]) &&
				!tz.next.eof && !tz.next.esc && isOctDigit(tz.next.ch) {
				digits = append(digits, tz.get().ch)
				v, _ := strconv.ParseUint(string(digits), 8, 32)
				if v > 0o377 {
					return nil, errPyInvalid // octal escape value outside of range
				}
				return &reNode{kind: reLiteral, r: rune(v)}, nil
			}
		}
		gid, _ := strconv.Atoi(string(digits))
		if gid < len(p.widths) {
			if !p.checkGroup(gid) {
				return nil, errPyInvalid // cannot refer to an open group
			}
			if err := p.checkLookbehindGroup(gid); err != nil {
				return nil, err
			}
			return &reNode{kind: reRef, group: gid}, nil
		}
		return nil, errPyInvalid // invalid group reference
	case isASCIILetterRune(c):
		return nil, errPyInvalid // bad escape
	}
	return &reNode{kind: reLiteral, r: c}, nil
}

// isPyIdentifier approximates python's str.isidentifier (XID_Start or "_",
// then XID_Continue) with Go's Unicode tables.
func isPyIdentifier(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		start := r == '_' || unicode.IsLetter(r) || unicode.Is(unicode.Nl, r) || unicode.Is(unicode.Other_ID_Start, r)
		if i == 0 {
			if !start || unicode.Is(unicode.Pattern_Syntax, r) {
				return false
			}
			continue
		}
		if !start && !unicode.In(r, unicode.Mn, unicode.Mc, unicode.Nd, unicode.Pc, unicode.Other_ID_Continue) {
			return false
		}
	}
	return true
}

// pyInt is python's int() of a string: white space around, an optional
// sign, decimal digits of any script with single underscores between them.
func pyInt(s string) (int64, bool) {
	s = trimSpace(s)
	neg := false
	if s != "" && (s[0] == '+' || s[0] == '-') {
		neg = s[0] == '-'
		s = s[1:]
	}
	if s == "" {
		return 0, false
	}
	var v int64
	digits := 0
	prevUnderscore := true // no leading underscore
	for _, r := range s {
		if r == '_' {
			if prevUnderscore {
				return 0, false
			}
			prevUnderscore = true
			continue
		}
		d, ok := pyDecimalValue(r)
		if !ok {
			return 0, false
		}
		prevUnderscore = false
		digits++
		if digits > maxIntDigits {
			return 0, false
		}
		if v < 1<<40 {
			v = v*10 + int64(d)
		}
	}
	if prevUnderscore {
		return 0, false
	}
	if neg {
		v = -v
	}
	return v, true
}

func satAdd(a, b uint64) uint64 {
	if a > pyMaxWidth-b || b > pyMaxWidth {
		return pyMaxWidth
	}
	return a + b
}

func satMul(a, b uint64) uint64 {
	if a == 0 || b == 0 {
		return 0
	}
	if a > pyMaxWidth/b {
		return pyMaxWidth
	}
	return a * b
}

// width is SubPattern.getwidth: the least and most characters a sequence
// matches.
func (p *pyParser) width(nodes []*reNode) (lo, hi uint64) {
	for _, n := range nodes {
		switch n.kind {
		case reBranch:
			i, j := uint64(pyMaxWidth), uint64(0)
			for _, alt := range n.alts {
				l, h := p.width(alt)
				i, j = min(i, l), max(j, h)
			}
			lo, hi = satAdd(lo, i), satAdd(hi, j)
		case reAtomic, reGroup:
			l, h := p.width(n.sub)
			lo, hi = satAdd(lo, l), satAdd(hi, h)
		case reRepeat:
			l, h := p.width(n.sub)
			lo = satAdd(lo, satMul(l, n.min))
			if n.max == pyMaxRepeat && h > 0 {
				hi = pyMaxWidth
			} else {
				hi = satAdd(hi, satMul(h, n.max))
			}
		case reLiteral, reNotLiteral, reSet, reAny:
			lo, hi = satAdd(lo, 1), satAdd(hi, 1)
		case reRef:
			w := p.widths[n.group]
			lo, hi = satAdd(lo, w.lo), satAdd(hi, w.hi)
		case reCond:
			i, j := p.width(n.sub)
			if n.hasNo {
				l, h := p.width(n.no)
				i, j = min(i, l), max(j, h)
			} else {
				i = 0
			}
			lo, hi = satAdd(lo, i), satAdd(hi, j)
		}
	}
	return min(lo, pyMaxWidth), min(hi, pyMaxWidth)
}

// checkCompile raises what python's compiler raises: a look-behind must have
// a fixed width no longer than MAXCODE, and the template flag forbids
// repeats.
func (p *pyParser) checkCompile(nodes []*reNode, flags pyFlags) error {
	for _, n := range nodes {
		switch n.kind {
		case reRepeat:
			if flags&pyTemplate != 0 {
				return errPyInvalid // internal: unsupported template operator
			}
		case reAssert:
			if n.behind {
				lo, hi := p.width(n.sub)
				if lo > pyMaxCode {
					return errPyInvalid // looks too much behind
				}
				if lo != hi {
					return errPyInvalid // look-behind requires fixed-width pattern
				}
			}
		}
		for _, s := range [][]*reNode{n.sub, n.no} {
			if err := p.checkCompile(s, flags); err != nil {
				return err
			}
		}
		for _, alt := range n.alts {
			if err := p.checkCompile(alt, flags); err != nil {
				return err
			}
		}
	}
	return nil
}

package eval

import (
	"unicode/utf8"
)

// pyRange is an inclusive range of code points in the tables of pyunicode.go.
type pyRange struct{ lo, hi rune }

// inPyRanges reports whether r lies in one of the sorted ranges.
func inPyRanges(table []pyRange, r rune) bool {
	_, ok := findPyRange(table, r)
	return ok
}

// findPyRange returns the index of the sorted range holding r.
func findPyRange(table []pyRange, r rune) (int, bool) {
	lo, hi := 0, len(table)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		switch {
		case r < table[m].lo:
			hi = m
		case r > table[m].hi:
			lo = m + 1
		default:
			return m, true
		}
	}
	return 0, false
}

// pyDecimalValue is the value python's int() gives one decimal digit. Every
// range of pyDecimal is a run of whole 0-9 sets, so the value is the offset
// from the range's start, modulo ten.
func pyDecimalValue(r rune) (byte, bool) {
	if r >= '0' && r <= '9' {
		return byte(r - '0'), true
	}
	if m, ok := findPyRange(pyDecimal, r); ok {
		return byte((r - pyDecimal[m].lo) % 10), true
	}
	return 0, false
}

func isASCIISpace(c byte) bool {
	return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f)
}

// trimSpace strips white space like Python's str.strip(): the characters of
// str.isspace, which are Unicode's white space plus the ASCII separators
// \x1c-\x1f. ASCII ends take a fast path.
func trimSpace(s string) string {
	if len(s) > 0 && s[0] < utf8.RuneSelf && !isASCIISpace(s[0]) &&
		s[len(s)-1] < utf8.RuneSelf && !isASCIISpace(s[len(s)-1]) {
		return s // the usual case: nothing to strip
	}
	for len(s) > 0 {
		if c := s[0]; c < utf8.RuneSelf {
			if !isASCIISpace(c) {
				break
			}
			s = s[1:]
			continue
		}
		r, n := utf8.DecodeRuneInString(s)
		if !inPyRanges(pySpace, r) || r == utf8.RuneError && n == 1 {
			break
		}
		s = s[n:]
	}
	for len(s) > 0 {
		if c := s[len(s)-1]; c < utf8.RuneSelf {
			if !isASCIISpace(c) {
				break
			}
			s = s[:len(s)-1]
			continue
		}
		r, n := utf8.DecodeLastRuneInString(s)
		if !inPyRanges(pySpace, r) || r == utf8.RuneError && n == 1 {
			break
		}
		s = s[:len(s)-n]
	}
	return s
}

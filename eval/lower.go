package eval

import (
	"strings"
	"unicode"
	"unicode/utf8"
)

// PostHog's flags service lower-cases with Rust's str::to_lowercase for exact and
// is_not: full Unicode lower-casing (not case folding, so "ß" stays "ß"), with the
// two rules that differ from a per-rune simple mapping: "İ" becomes "i̇" (two runes)
// and a capital sigma at the end of a word becomes the final form "ς". For
// icontains, starts_with, ends_with and their negations it lower-cases ASCII only.
// The helpers below reproduce both without allocating on the request path.

const (
	capitalSigma     = 'Σ'
	smallSigma       = 'σ'
	smallFinalSigma  = 'ς'
	capitalIWithDot  = 'İ'
	combiningDotAbov = '\u0307'
)

// lowerString is Rust's str::to_lowercase. Used when compiling definitions.
func lowerString(s string) string {
	if isASCIILower(s) {
		return s
	}
	var sb strings.Builder
	sb.Grow(len(s))
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			sb.WriteByte(s[i])
			i++
			continue
		}
		var buf [2]rune
		n := lowerRune(s, i, r, size, &buf)
		for k := 0; k < n; k++ {
			sb.WriteRune(buf[k])
		}
		i += size
	}
	return sb.String()
}

// equalLower reports whether lowerString(s) == lowered without building the
// lower-cased copy of s.
func equalLower(s, lowered string) bool {
	j := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			if j >= len(lowered) || lowered[j] != c {
				return false
			}
			i++
			j++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			// Invalid UTF-8 never equals a definition's (valid) text.
			return false
		}
		var buf [2]rune
		n := lowerRune(s, i, r, size, &buf)
		for k := 0; k < n; k++ {
			if j >= len(lowered) {
				return false
			}
			lr, lsize := utf8.DecodeRuneInString(lowered[j:])
			if lr != buf[k] {
				return false
			}
			j += lsize
		}
		i += size
	}
	return j == len(lowered)
}

// lowerRune lower-cases the rune r found at byte offset i of s (it needs s for the
// final-sigma context) into buf and returns how many runes it wrote.
func lowerRune(s string, i int, r rune, size int, buf *[2]rune) int {
	switch r {
	case capitalIWithDot:
		buf[0], buf[1] = 'i', combiningDotAbov
		return 2
	case capitalSigma:
		if casedBefore(s[:i]) && !casedAfter(s[i+size:]) {
			buf[0] = smallFinalSigma
		} else {
			buf[0] = smallSigma
		}
		return 1
	}
	buf[0] = unicode.ToLower(r)
	return 1
}

// casedBefore: skipping case-ignorable runes backwards, the next rune is cased.
func casedBefore(s string) bool {
	for len(s) > 0 {
		r, size := utf8.DecodeLastRuneInString(s)
		if !isCaseIgnorable(r) {
			return isCased(r)
		}
		s = s[:len(s)-size]
	}
	return false
}

// casedAfter: skipping case-ignorable runes forwards, the next rune is cased.
func casedAfter(s string) bool {
	for len(s) > 0 {
		r, size := utf8.DecodeRuneInString(s)
		if !isCaseIgnorable(r) {
			return isCased(r)
		}
		s = s[size:]
	}
	return false
}

func isCased(r rune) bool {
	return unicode.IsLower(r) || unicode.IsUpper(r) || unicode.IsTitle(r) ||
		unicode.Is(unicode.Other_Lowercase, r) || unicode.Is(unicode.Other_Uppercase, r)
}

// isCaseIgnorable approximates Unicode's Case_Ignorable property: nonspacing and
// enclosing marks, format characters, modifier letters and symbols, and the
// word-break MidLetter/MidNumLet/Single_Quote characters.
func isCaseIgnorable(r rune) bool {
	switch r {
	case '\'', '.', ':', '^', '`', '\u00B7', '\u0387', '\u055F', '\u05F4', '\u2018', '\u2019',
		'\u2024', '\u2027', '\uFE13', '\uFE52', '\uFE55', '\uFF07', '\uFF0E', '\uFF1A':
		return true
	}
	return unicode.In(r, unicode.Mn, unicode.Me, unicode.Cf, unicode.Lm, unicode.Sk)
}

func isASCIILower(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= utf8.RuneSelf || ('A' <= c && c <= 'Z') {
			return false
		}
	}
	return true
}

// asciiLower lower-cases ASCII letters only, like Rust's to_ascii_lowercase.
func asciiLower(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; 'A' <= c && c <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if 'A' <= b[j] && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}

func lowerASCIIByte(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// asciiEqualFold compares two strings with ASCII-only case folding.
func asciiEqualFold(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		if lowerASCIIByte(a[i]) != lowerASCIIByte(b[i]) {
			return false
		}
	}
	return true
}

// hasPrefixASCIIFold reports whether s, ASCII-lower-cased, starts with lowerPrefix.
func hasPrefixASCIIFold(s, lowerPrefix string) bool {
	if len(s) < len(lowerPrefix) {
		return false
	}
	for i := 0; i < len(lowerPrefix); i++ {
		if lowerASCIIByte(s[i]) != lowerPrefix[i] {
			return false
		}
	}
	return true
}

// hasSuffixASCIIFold reports whether s, ASCII-lower-cased, ends with lowerSuffix.
func hasSuffixASCIIFold(s, lowerSuffix string) bool {
	return len(s) >= len(lowerSuffix) && hasPrefixASCIIFold(s[len(s)-len(lowerSuffix):], lowerSuffix)
}

// containsASCIIFold reports whether s, ASCII-lower-cased, contains lowerNeedle.
func containsASCIIFold(s, lowerNeedle string) bool {
	n := len(lowerNeedle)
	if n == 0 {
		return true
	}
	first := lowerNeedle[0]
	for i := 0; i+n <= len(s); i++ {
		if lowerASCIIByte(s[i]) == first && hasPrefixASCIIFold(s[i:], lowerNeedle) {
			return true
		}
	}
	return false
}

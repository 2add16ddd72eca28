package eval

import (
	"strings"
	"unicode"
	"unicode/utf8"
)

// semver is a MAJOR.MINOR.PATCH triple. Components are kept as digit strings
// without leading zeros, so arbitrarily large numbers compare correctly (by length,
// then lexically) and parsing a request's value does not allocate.
type semver [3]string

// parseSemver reads a version the way posthog-python does: trim, drop one leading
// "v" or "V", ignore everything from the first "-" or "+" (pre-release and build
// do not take part), then one to three dot-separated numeric components with no
// leading zeros; missing components are 0 and components past the third are
// ignored.
func parseSemver(s string) (semver, bool) {
	s = trimSpace(s)
	if len(s) > 0 && (s[0] == 'v' || s[0] == 'V') {
		s = s[1:]
	}
	v := semver{"0", "0", "0"}
	// One pass: split on dots up to the first '-' or '+' or the third component.
	n, start := 0, 0
	for i := 0; ; i++ {
		end := i == len(s) || s[i] == '-' || s[i] == '+'
		if end || s[i] == '.' {
			part := s[start:i]
			if !validComponent(part) {
				return v, false
			}
			v[n] = part
			n++
			if end || n == 3 {
				return v, true
			}
			start = i + 1
		}
	}
}

// trimSpace strips white space like Python's str.strip(): ASCII white space and
// the ASCII separators \x1c-\x1f on a fast path, Unicode white space otherwise.
func trimSpace(s string) string {
	for len(s) > 0 && isSpace(s[0]) {
		s = s[1:]
	}
	for len(s) > 0 && isSpace(s[len(s)-1]) {
		s = s[:len(s)-1]
	}
	if len(s) > 0 && (s[0] >= utf8.RuneSelf || s[len(s)-1] >= utf8.RuneSelf) {
		s = strings.TrimFunc(s, unicode.IsSpace)
	}
	return s
}

func isSpace(c byte) bool {
	return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f)
}

func validComponent(p string) bool {
	if p == "" || (len(p) > 1 && p[0] == '0') {
		return false
	}
	for i := 0; i < len(p); i++ {
		if p[i] < '0' || p[i] > '9' {
			return false
		}
	}
	return true
}

func (a semver) compare(b semver) int {
	for i := 0; i < 3; i++ {
		if c := compareDigits(a[i], b[i]); c != 0 {
			return c
		}
	}
	return 0
}

func compareDigits(a, b string) int {
	if len(a) != len(b) {
		if len(a) < len(b) {
			return -1
		}
		return 1
	}
	return strings.Compare(a, b)
}

// incrementDigits adds one to a non-negative decimal number.
func incrementDigits(s string) string {
	b := []byte(s)
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] < '9' {
			b[i]++
			return string(b)
		}
		b[i] = '0'
	}
	return "1" + string(b)
}

// semverRange turns a tilde, caret or wildcard filter into [lo, hi).
func semverRange(op operator, value string) (lo, hi semver, ok bool) {
	switch op {
	case opSemverTilde:
		if lo, ok = parseSemver(value); !ok {
			return lo, hi, false
		}
		return lo, semver{lo[0], incrementDigits(lo[1]), "0"}, true
	case opSemverCaret:
		if lo, ok = parseSemver(value); !ok {
			return lo, hi, false
		}
		switch {
		case lo[0] != "0":
			hi = semver{incrementDigits(lo[0]), "0", "0"}
		case lo[1] != "0":
			hi = semver{"0", incrementDigits(lo[1]), "0"}
		default:
			hi = semver{"0", "0", incrementDigits(lo[2])}
		}
		return lo, hi, true
	case opSemverWildcard:
		s := strings.TrimSpace(value)
		if len(s) > 0 && (s[0] == 'v' || s[0] == 'V') {
			s = s[1:]
		}
		s = strings.TrimRight(strings.ReplaceAll(s, "*", ""), ".")
		if s == "" {
			return lo, hi, false
		}
		parts := strings.Split(s, ".")
		if len(parts) > 3 {
			parts = parts[:3]
		}
		lo = semver{"0", "0", "0"}
		for i, p := range parts {
			if !validComponent(p) {
				return lo, hi, false
			}
			lo[i] = p
		}
		hi = lo
		last := len(parts) - 1
		hi[last] = incrementDigits(lo[last])
		return lo, hi, true
	}
	return lo, hi, false
}

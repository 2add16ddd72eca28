package eval

import (
	"strings"
	"unicode/utf8"
)

// semver is a MAJOR.MINOR.PATCH triple. Components are kept as ASCII digit
// strings without leading zeros, so arbitrarily large numbers compare correctly
// (by length, then lexically) and parsing a request's ASCII value does not
// allocate.
type semver [3]string

// maxIntDigits is Python 3.11's default limit on the digits int() converts
// (sys.get_int_max_str_digits()); posthog-python's int() of a longer
// component raises, which makes the comparison inconclusive.
const maxIntDigits = 4300

// parseSemver reads a version the way posthog-python's parse_semver does
// (ruling of 2026-12-02): strip white space, strip every leading "v" or "V",
// cut at the first "-" or "+" (pre-release and build do not take part), split
// on dots. The major component must be present; a missing or empty minor or
// patch is 0 ("2." is 2.0.0, "1..3" is 1.0.3); components past the third are
// not looked at. Each component must be digits as python's int() reads them,
// Unicode decimal digits included ("１.２.３" is 1.2.3), without a leading
// ASCII "0".
func parseSemver(s string) (semver, bool) {
	s = trimSpace(s)
	for len(s) > 0 && (s[0] == 'v' || s[0] == 'V') {
		s = s[1:]
	}
	v := semver{"0", "0", "0"}
	// One pass: components end at a dot; the version ends at the first "-"
	// or "+", or after the third component (the rest is never read).
	n, start := 0, 0
	for i := 0; ; i++ {
		end := i == len(s) || s[i] == '-' || s[i] == '+'
		if !end && s[i] != '.' {
			continue
		}
		if part := s[start:i]; part != "" {
			c, ok := numericIdentifier(part)
			if !ok {
				return v, false
			}
			v[n] = c
		} else if n == 0 {
			return v, false
		}
		n++
		if end || n == 3 {
			return v, true
		}
		start = i + 1
	}
}

// numericIdentifier is posthog-python's _semver_numeric_identifier: digits
// (what both str.isdigit and int() accept, which is the decimal digits),
// no leading ASCII zero unless the component is "0", at most maxIntDigits
// of them. It returns the value as ASCII digits without leading zeros.
func numericIdentifier(p string) (string, bool) {
	if p == "" || len(p) > 1 && p[0] == '0' {
		return "", false
	}
	ascii := true
	for i := 0; i < len(p); i++ {
		if p[i] >= utf8.RuneSelf {
			ascii = false
			break
		}
		if p[i] < '0' || p[i] > '9' {
			return "", false
		}
	}
	if ascii {
		return p, len(p) <= maxIntDigits
	}
	// Other scripts' digits (rare): convert, then drop the leading zeros the
	// ASCII check does not see ("０1" is 1 in python).
	if utf8.RuneCountInString(p) > maxIntDigits {
		return "", false
	}
	out := make([]byte, 0, len(p))
	for _, r := range p {
		d, ok := pyDecimalValue(r)
		if !ok {
			return "", false
		}
		if d == 0 && len(out) == 0 {
			continue
		}
		out = append(out, '0'+d)
	}
	if len(out) == 0 {
		return "0", true
	}
	return string(out), true
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

// semverRange turns a tilde, caret or wildcard filter into [lo, hi), as
// posthog-python's _tilde_bounds, _caret_bounds and _wildcard_bounds do.
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
		// Strip, strip every leading v, drop every "*", then the non-empty
		// dot-separated parts (so "1.*.3" is 1.3.x and "*.1" is 1.x.x); the
		// last of at most three parts is the one that varies. No "-" or "+"
		// handling here: "1.2-beta.*" is invalid, as in posthog-python.
		s := trimSpace(value)
		for len(s) > 0 && (s[0] == 'v' || s[0] == 'V') {
			s = s[1:]
		}
		s = strings.ReplaceAll(s, "*", "")
		lo = semver{"0", "0", "0"}
		n := 0
		for _, part := range strings.Split(s, ".") {
			if part == "" {
				continue
			}
			if n == 3 {
				break
			}
			c, valid := numericIdentifier(part)
			if !valid {
				return lo, hi, false
			}
			lo[n] = c
			n++
		}
		if n == 0 {
			return lo, hi, false
		}
		hi = lo
		hi[n-1] = incrementDigits(lo[n-1])
		return lo, hi, true
	}
	return lo, hi, false
}

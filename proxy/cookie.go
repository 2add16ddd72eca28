package proxy

import (
	"net/http"
	"strings"
)

// findCookie returns the value of the first cookie named name in the request's
// Cookie headers, without building http.Cookie values for every cookie (which
// http.Request.Cookie does on each call). Quotes around a value are removed.
func findCookie(h http.Header, name string) (string, bool) {
	return scanCookies(h, func(n string) bool { return n == name })
}

// findPostHogCookie returns the first cookie named ph_<anything>_posthog.
func findPostHogCookie(h http.Header) (string, bool) {
	return scanCookies(h, func(n string) bool {
		return len(n) > len("ph__posthog") && strings.HasPrefix(n, "ph_") && strings.HasSuffix(n, "_posthog")
	})
}

func scanCookies(h http.Header, match func(name string) bool) (string, bool) {
	for _, line := range h["Cookie"] {
		for len(line) > 0 {
			var part string
			part, line, _ = strings.Cut(line, ";")
			part = strings.TrimSpace(part)
			name, value, ok := strings.Cut(part, "=")
			if !ok || !match(strings.TrimSpace(name)) {
				continue
			}
			value = strings.TrimSpace(value)
			if len(value) >= 2 && value[0] == '"' && value[len(value)-1] == '"' {
				value = value[1 : len(value)-1]
			}
			return value, true
		}
	}
	return "", false
}

// PostHogCookieName is the cookie posthog-js keeps its state in for a project
// token: ph_<token>_posthog, with "+", "/" and "=" spelled PL, SL and EQ.
func PostHogCookieName(projectKey string) string {
	r := strings.NewReplacer("+", "PL", "/", "SL", "=", "EQ")
	return "ph_" + r.Replace(projectKey) + "_posthog"
}

// encodeURIComponent escapes like JavaScript's function of that name, which is
// how posthog-js writes its cookie.
func encodeURIComponent(s string) string {
	const hex = "0123456789ABCDEF"
	var sb strings.Builder
	sb.Grow(len(s) * 3 / 2)
	for i := 0; i < len(s); i++ {
		c := s[i]
		if ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') || ('0' <= c && c <= '9') ||
			strings.IndexByte("-_.!~*'()", c) >= 0 {
			sb.WriteByte(c)
			continue
		}
		sb.WriteByte('%')
		sb.WriteByte(hex[c>>4])
		sb.WriteByte(hex[c&15])
	}
	return sb.String()
}

// decodeURIComponent reverses encodeURIComponent: %XX escapes only ("+" stays a
// plus). A malformed escape is an error, as in JavaScript. The input is returned
// as is, without allocating, when it holds no escapes.
func decodeURIComponent(s string) (string, bool) {
	n := strings.IndexByte(s, '%')
	if n < 0 {
		return s, true
	}
	b := make([]byte, 0, len(s))
	b = append(b, s[:n]...)
	for i := n; i < len(s); i++ {
		c := s[i]
		if c != '%' {
			b = append(b, c)
			continue
		}
		if i+2 >= len(s) {
			return "", false
		}
		hi, ok1 := unhex(s[i+1])
		lo, ok2 := unhex(s[i+2])
		if !ok1 || !ok2 {
			return "", false
		}
		b = append(b, hi<<4|lo)
		i += 2
	}
	return string(b), true
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

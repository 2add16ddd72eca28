package proxy

import (
	"net/http"
	"net/textproto"
	"strings"
)

// Header names flagsplit sets on requests to the upstream, canonical form.
const (
	// DistinctIDHeader carries the resolved distinct id.
	DistinctIDHeader = "X-Posthog-Distinct-Id"
	// FlagHeaderPrefix starts the per-flag headers: X-Feature-Flag-<flag key>.
	FlagHeaderPrefix = "X-Feature-Flag-"
)

// FlagHeaderName is the canonical header name for a flag key. Characters a header
// name cannot hold become "-" (PostHog flag keys are letters, digits, "-" and
// "_", which need no change).
func FlagHeaderName(key string) string {
	var sb strings.Builder
	sb.Grow(len(FlagHeaderPrefix) + len(key))
	sb.WriteString(FlagHeaderPrefix)
	for i := 0; i < len(key); i++ {
		c := key[i]
		if isTokenChar(c) {
			sb.WriteByte(c)
		} else {
			sb.WriteByte('-')
		}
	}
	return textproto.CanonicalMIMEHeaderKey(sb.String())
}

// isTokenChar reports whether c may appear in an HTTP header name (RFC 9110 tchar).
func isTokenChar(c byte) bool {
	if ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') || ('0' <= c && c <= '9') {
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// StripClientHeaders removes every flagsplit header a client sent, so a client
// can never choose its own variant: X-PostHog-Distinct-Id and all
// X-Feature-Flag-* headers, in any letter case.
func StripClientHeaders(h http.Header) {
	for name := range h {
		if isFlagsplitHeader(name) {
			delete(h, name)
		}
	}
}

func isFlagsplitHeader(name string) bool {
	if len(name) >= len(FlagHeaderPrefix) && strings.EqualFold(name[:len(FlagHeaderPrefix)], FlagHeaderPrefix) {
		return true
	}
	return strings.EqualFold(name, DistinctIDHeader)
}

// HeaderWriter sets flagsplit's headers for one request with a single
// allocation for all values.
type HeaderWriter struct {
	// Names are the canonical header names, one per flag.
	Names []string
}

// rebuildFrom is the number of flag headers from which Apply builds a new
// header map of the right size instead of growing the request's map: adding
// dozens of keys to a small map rehashes it several times.
const rebuildFrom = 4

// Apply removes every flagsplit header the client sent (see
// StripClientHeaders) and sets the distinct id and one value per flag
// (values(i) for Names[i]).
func (hw *HeaderWriter) Apply(r *http.Request, distinctID string, values func(i int) string) {
	h := r.Header
	if len(hw.Names) >= rebuildFrom {
		fresh := make(http.Header, len(h)+len(hw.Names)+1)
		for name, v := range h {
			if !isFlagsplitHeader(name) {
				fresh[name] = v
			}
		}
		h = fresh
		r.Header = h
	} else {
		StripClientHeaders(h)
	}
	backing := make([]string, len(hw.Names)+1)
	backing[0] = distinctID
	h[DistinctIDHeader] = backing[0:1:1]
	for i, name := range hw.Names {
		backing[i+1] = values(i)
		h[name] = backing[i+1 : i+2 : i+2]
	}
}

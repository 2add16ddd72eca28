package proxy

import (
	"fmt"
	"net/http"
	"net/textproto"
	"sort"
	"strings"
)

// Header names flagsplit sets on requests to the upstream, canonical form.
const (
	// DistinctIDHeader carries the resolved distinct id.
	DistinctIDHeader = "X-Posthog-Distinct-Id"
	// FlagHeaderPrefix starts the per-flag headers: X-Feature-Flag-<flag key>.
	FlagHeaderPrefix = "X-Feature-Flag-"
	// DictionaryHeader carries every flag in one RFC 8941 dictionary (the
	// dictionary header form).
	DictionaryHeader = "X-Feature-Flags"
)

// HeaderMode is how the evaluated flags reach the upstream.
type HeaderMode uint8

// Header forms.
const (
	// HeadersPerFlag sends X-PostHog-Distinct-Id and one
	// X-Feature-Flag-<flag key> header per flag (the default).
	HeadersPerFlag HeaderMode = iota
	// HeadersDictionary sends X-PostHog-Distinct-Id and one X-Feature-Flags
	// structured-field dictionary holding every flag.
	HeadersDictionary
	// HeadersOff sends only X-PostHog-Distinct-Id: flags still route
	// (matchers, lb_policy and placeholders read the request's state, not
	// headers), but no flag header travels to the upstream.
	HeadersOff
)

var headerModeNames = [...]string{"per_flag", "dictionary", "off"}

func (m HeaderMode) String() string {
	if int(m) < len(headerModeNames) {
		return headerModeNames[m]
	}
	return fmt.Sprintf("headers(%d)", uint8(m))
}

// ParseHeaderMode reads a header form as written in the config; "" is the
// default, per_flag.
func ParseHeaderMode(s string) (HeaderMode, error) {
	if s == "" {
		return HeadersPerFlag, nil
	}
	for i, name := range headerModeNames {
		if s == name {
			return HeaderMode(i), nil
		}
	}
	return 0, fmt.Errorf("unknown headers form %q (want per_flag, dictionary or off)", s)
}

// ManyFlagHeaders is the number of per-flag headers above which flagsplit
// warns: past a few dozen request headers, backends start to refuse requests
// (Python's http.server answers 431 past 100 headers, many servers cap the
// header block at 8 KB) and every header costs proxy and upstream time.
const ManyFlagHeaders = 50

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

// foldHeaderByte is how CGI-style backends see a header-name byte: CGI,
// WSGI, FastCGI and PHP upper-case names and turn "-" into "_" (PHP also
// ".") to make HTTP_<NAME> variables, so X-Feature-Flag-Beta,
// x_feature_flag_beta and X.Feature.Flag.BETA are the same variable there.
// Names are compared under this folding.
func foldHeaderByte(c byte) byte {
	switch {
	case 'A' <= c && c <= 'Z':
		return c + 'a' - 'A'
	case c == '_' || c == '.':
		return '-'
	}
	return c
}

// foldHasPrefix reports whether name starts with prefix (lower case, "-")
// under foldHeaderByte.
func foldHasPrefix(name, prefix string) bool {
	if len(name) < len(prefix) {
		return false
	}
	for i := 0; i < len(prefix); i++ {
		if foldHeaderByte(name[i]) != prefix[i] {
			return false
		}
	}
	return true
}

func foldEqual(name, want string) bool { return len(name) == len(want) && foldHasPrefix(name, want) }

// headerVariable is the name a CGI-style backend gives a header, folded
// (lower case, separators as "-").
func headerVariable(name string) string {
	b := []byte(name)
	for i, c := range b {
		b[i] = foldHeaderByte(c)
	}
	return string(b)
}

// IsFlagsplitHeader reports whether a request header is one flagsplit sets,
// in any spelling a backend could read as one: X-PostHog-Distinct-Id,
// X-Feature-Flags and any X-Feature-Flag-*, in any letter case and with "_"
// or "." for "-".
func IsFlagsplitHeader(name string) bool {
	return foldHasPrefix(name, "x-feature-flag-") ||
		foldEqual(name, "x-posthog-distinct-id") ||
		foldEqual(name, "x-feature-flags")
}

// StripClientHeaders removes every flagsplit header a client sent, so a client
// can never choose its own variant (see IsFlagsplitHeader), and removes
// flagsplit's names from the client's Connection header, so that
// reverse_proxy, which drops every header Connection names as hop-by-hop,
// does not drop the ones flagsplit sets. The Connection header's other
// tokens are kept.
func StripClientHeaders(h http.Header) {
	for name := range h {
		if IsFlagsplitHeader(name) {
			delete(h, name)
		}
	}
	stripConnectionTokens(h)
}

// stripConnectionTokens removes flagsplit's names from the Connection
// header, rewriting it only when it names one.
func stripConnectionTokens(h http.Header) {
	lines, ok := h["Connection"]
	if !ok {
		return
	}
	names := false
	for _, line := range lines {
		for tok := range strings.SplitSeq(line, ",") {
			if IsFlagsplitHeader(textproto.TrimString(tok)) {
				names = true
			}
		}
	}
	if !names {
		return
	}
	var kept []string
	for _, line := range lines {
		for tok := range strings.SplitSeq(line, ",") {
			if tok = textproto.TrimString(tok); tok != "" && !IsFlagsplitHeader(tok) {
				kept = append(kept, tok)
			}
		}
	}
	if len(kept) == 0 {
		delete(h, "Connection")
		return
	}
	h["Connection"] = []string{strings.Join(kept, ", ")}
}

// HeaderCollision is a set of flag keys whose X-Feature-Flag-* headers a
// backend would read as one (see foldHeaderByte): "beta" and "Beta",
// "sp ace" and "sp-ace", "dash-key" and "dash_key". None of them gets a
// per-flag header, since a backend could not tell which value it read.
type HeaderCollision struct {
	// Header is the header name the keys share, folded to lower case.
	Header string
	// Keys are the colliding flag keys, sorted.
	Keys []string
}

func (c HeaderCollision) String() string {
	return fmt.Sprintf("flags %s all map to the header %s (backends such as CGI/WSGI ignore case and read \"_\" as \"-\"); none of them gets a per-flag header: use `headers dictionary`, placeholders or matchers for them, or rename one",
		quoteAll(c.Keys), c.Header)
}

func quoteAll(keys []string) string {
	q := make([]string, len(keys))
	for i, k := range keys {
		q[i] = fmt.Sprintf("%q", k)
	}
	return strings.Join(q, ", ")
}

// FlagHeaderNames returns the per-flag header name of each key, "" for the
// keys whose headers collide (reported in collisions, sorted by header).
func FlagHeaderNames(keys []string) (names []string, collisions []HeaderCollision) {
	names = make([]string, len(keys))
	byVar := make(map[string][]int, len(keys))
	for i, key := range keys {
		names[i] = FlagHeaderName(key)
		v := headerVariable(names[i])
		byVar[v] = append(byVar[v], i)
	}
	for v, idx := range byVar {
		if len(idx) < 2 {
			continue
		}
		c := HeaderCollision{Header: v}
		for _, i := range idx {
			names[i] = ""
			c.Keys = append(c.Keys, keys[i])
		}
		sort.Strings(c.Keys)
		collisions = append(collisions, c)
	}
	sort.Slice(collisions, func(i, j int) bool { return collisions[i].Header < collisions[j].Header })
	return names, collisions
}

// HeaderWriter sets flagsplit's headers for one request in one of the
// header forms, prepared once per flag selection.
type HeaderWriter struct {
	mode HeaderMode
	// names are the per-flag header names ("" for a flag that gets none).
	names []string
	sent  int
	dict  DictionaryWriter
}

// NewHeaderWriter prepares the headers of the flags keys in a form. The
// collisions are the per-flag headers left out (per_flag form only; the
// dictionary's keys never collide).
func NewHeaderWriter(mode HeaderMode, keys []string) (*HeaderWriter, []HeaderCollision) {
	hw := &HeaderWriter{mode: mode}
	var collisions []HeaderCollision
	switch mode {
	case HeadersPerFlag:
		hw.names, collisions = FlagHeaderNames(keys)
		for _, n := range hw.names {
			if n != "" {
				hw.sent++
			}
		}
	case HeadersDictionary:
		hw.dict = NewDictionaryWriter(keys)
	}
	return hw, collisions
}

// Mode is the writer's header form.
func (hw *HeaderWriter) Mode() HeaderMode { return hw.mode }

// FlagHeaders is the number of flag headers each request gets: one per
// flag (less the colliding ones) in per_flag, 1 in dictionary, 0 when off.
func (hw *HeaderWriter) FlagHeaders() int {
	switch hw.mode {
	case HeadersPerFlag:
		return hw.sent
	case HeadersDictionary:
		return 1
	}
	return 0
}

// rebuildFrom is the number of headers from which Apply builds a new
// header map of the right size instead of growing the request's map: adding
// dozens of keys to a small map rehashes it several times.
const rebuildFrom = 16

// HeaderScratch is room for one request's header values, kept by the
// caller as long as the request (in its per-request state, which it
// allocates anyway), so that the usual handful of values and a short
// dictionary need no allocation of their own. A scratch serves one Apply:
// the request's headers share its storage.
type HeaderScratch struct {
	values [8]string
	dict   [160]byte
}

// Apply removes every flagsplit header the client sent (see
// StripClientHeaders) and sets the distinct id (when there is one) and the
// flags' values (values(i) for flag i) in the writer's form. scratch, when
// not nil, holds the values if they fit (see HeaderScratch).
func (hw *HeaderWriter) Apply(r *http.Request, distinctID string, values func(i int) string, scratch *HeaderScratch) {
	h := r.Header
	if hw.sent >= rebuildFrom {
		fresh := make(http.Header, len(h)+hw.sent+1)
		for name, v := range h {
			if !IsFlagsplitHeader(name) {
				fresh[name] = v
			}
		}
		stripConnectionTokens(fresh)
		h = fresh
		r.Header = h
	} else {
		StripClientHeaders(h)
	}
	n := 1
	switch hw.mode {
	case HeadersPerFlag:
		n += hw.sent
	case HeadersDictionary:
		n++
	}
	// One array holds every value.
	var backing []string
	if scratch != nil && n <= len(scratch.values) {
		backing = scratch.values[:n:n]
	} else {
		backing = make([]string, n)
	}
	if distinctID != "" {
		backing[0] = distinctID
		h[DistinctIDHeader] = backing[0:1:1]
	}
	switch hw.mode {
	case HeadersPerFlag:
		k := 1
		for i, name := range hw.names {
			if name == "" {
				continue
			}
			backing[k] = values(i)
			h[name] = backing[k : k+1 : k+1]
			k++
		}
	case HeadersDictionary:
		if len(hw.dict.keys) > 0 {
			var buf []byte
			if scratch != nil {
				buf = scratch.dict[:0]
			}
			backing[1] = hw.dict.stringIn(buf, values)
			h[DictionaryHeader] = backing[1:2:2]
		}
	}
}

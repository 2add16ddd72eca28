package proxy

import (
	"fmt"
	"net/http"
	"net/textproto"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
)

// SourceKind is where a distinct id came from.
type SourceKind uint8

// Identity sources, in the words of the Caddyfile.
const (
	SourceNone SourceKind = iota
	// SourceHeader: a request header set by something trusted (posthog-js's
	// tracing headers, an auth proxy).
	SourceHeader
	// SourcePostHogCookie: the posthog-js cookie ph_<project key>_posthog.
	SourcePostHogCookie
	// SourceCookie: a cookie whose whole value is the id.
	SourceCookie
	// SourcePlaceholder: any Caddy placeholder (e.g. a JWT claim).
	SourcePlaceholder
	// SourceAssigned: no id was found; flagsplit minted one.
	SourceAssigned
)

var sourceNames = [...]string{"none", "header", "posthog_cookie", "cookie", "placeholder", "assigned"}

func (k SourceKind) String() string {
	if int(k) < len(sourceNames) {
		return sourceNames[k]
	}
	return fmt.Sprintf("source(%d)", uint8(k))
}

// Source is one place to look for the distinct id.
type Source struct {
	Kind SourceKind
	// Name is the header or cookie name, or the placeholder; unused for the
	// posthog-js cookie.
	Name string
}

// Identity is who a request is.
type Identity struct {
	DistinctID string
	// DeviceID is posthog-js's anonymous device id, when the cookie carries one.
	DeviceID string
	Source   SourceKind
}

// AssignedCookieName is the cookie an assigned id goes into when no project key
// is configured (posthog-js's cookie name needs the key).
const AssignedCookieName = "flagsplit_id"

// MaxIDLength bounds accepted ids. PostHog itself refuses distinct ids longer than
// 200 characters; longer values are treated as malformed rather than letting a
// client fill the result cache with megabyte keys.
const MaxIDLength = 200

// DefaultSources is the identity chain when none is configured: posthog-js's
// tracing header, then its cookie.
var DefaultSources = []Source{
	{Kind: SourceHeader, Name: "X-POSTHOG-DISTINCT-ID"},
	{Kind: SourcePostHogCookie},
}

// Resolver finds a request's distinct id by trying its sources in order.
type Resolver struct {
	sources []Source
	// postHogCookie is the exact posthog-js cookie name, "" to accept any
	// ph_*_posthog cookie.
	postHogCookie string
	assign        bool
	// assignCookie is the cookie an assigned id is written to.
	assignCookie string
}

// NewResolver builds a resolver. projectKey, when set, pins the posthog-js cookie
// name. With assign, a request without an id gets a new one; the cookie it is
// stored in is read back even if no source names it, so the id sticks.
func NewResolver(sources []Source, projectKey string, assign bool) *Resolver {
	if len(sources) == 0 {
		sources = DefaultSources
	}
	r := &Resolver{sources: append([]Source(nil), sources...), assign: assign}
	for i := range r.sources {
		if r.sources[i].Kind == SourceHeader {
			// Canonical once here, so lookups need not canonicalise (and
			// allocate) per request.
			r.sources[i].Name = textproto.CanonicalMIMEHeaderKey(r.sources[i].Name)
		}
	}
	if projectKey != "" {
		r.postHogCookie = PostHogCookieName(projectKey)
		r.assignCookie = r.postHogCookie
	} else {
		r.assignCookie = AssignedCookieName
	}
	if assign {
		readBack := Source{Kind: SourcePostHogCookie}
		if projectKey == "" {
			readBack = Source{Kind: SourceCookie, Name: AssignedCookieName}
		}
		if !r.has(readBack) {
			r.sources = append(r.sources, readBack)
		}
	}
	return r
}

func (r *Resolver) has(s Source) bool {
	for _, x := range r.sources {
		if x.Kind == s.Kind && (s.Kind == SourcePostHogCookie || strings.EqualFold(x.Name, s.Name)) {
			return true
		}
	}
	return false
}

// Sources returns the sources tried, in order (including the implicit one that
// reads an assigned id back).
func (r *Resolver) Sources() []Source { return r.sources }

// Assigns reports whether requests without an id get one.
func (r *Resolver) Assigns() bool { return r.assign }

// AssignCookieName is the cookie assigned ids are written to.
func (r *Resolver) AssignCookieName() string { return r.assignCookie }

// Placeholders expands placeholders in a string; *caddy.Replacer is one.
type Placeholders interface {
	ReplaceAll(input, empty string) string
}

// SourceSet is a set of source kinds.
type SourceSet uint8

// Add returns the set with k in it.
func (s SourceSet) Add(k SourceKind) SourceSet { return s | 1<<k }

// Has reports whether k is in the set.
func (s SourceSet) Has(k SourceKind) bool { return s&(1<<k) != 0 }

// Resolve returns the first id the sources yield. placeholders expands
// placeholder sources (nil when none are configured). A source whose value is
// present but malformed (empty, over MaxIDLength bytes, not UTF-8, holding
// control characters, or a posthog-js cookie that does not parse) is skipped
// for the next one and reported in malformed, so the caller can count and log
// it; a malformed value never fails the request. A placeholder that expands
// to nothing is absent, not malformed.
func (r *Resolver) Resolve(req *http.Request, placeholders Placeholders) (id Identity, malformed SourceSet) {
	for _, src := range r.sources {
		var value string
		switch src.Kind {
		case SourceHeader:
			vals, ok := req.Header[src.Name]
			if !ok || len(vals) == 0 {
				continue
			}
			value = strings.TrimSpace(vals[0])
		case SourceCookie:
			v, ok := findCookie(req.Header, src.Name)
			if !ok {
				continue
			}
			value = strings.TrimSpace(v)
		case SourcePlaceholder:
			if placeholders != nil {
				value = strings.TrimSpace(placeholders.ReplaceAll(src.Name, ""))
			}
			if value == "" {
				continue
			}
		case SourcePostHogCookie:
			raw, ok := r.postHogCookieValue(req.Header)
			if !ok {
				continue
			}
			st, err := ParsePostHogCookie(raw)
			if err != nil || !validID(st.DistinctID) {
				malformed = malformed.Add(src.Kind)
				continue
			}
			device := st.DeviceID
			if !validID(device) {
				device = ""
			}
			return Identity{DistinctID: st.DistinctID, DeviceID: device, Source: src.Kind}, malformed
		}
		if !validID(value) {
			malformed = malformed.Add(src.Kind)
			continue
		}
		return Identity{DistinctID: value, Source: src.Kind}, malformed
	}
	return Identity{}, malformed
}

// HoldsAssignCookie reports whether the request carries the cookie assigned
// ids are written to. When Resolve found no id in such a request, the cookie
// is one flagsplit cannot read (a posthog-js cookie it cannot parse, or an
// id it refuses): an assigned id must then not be stored over it, which would
// erase the user's posthog-js identity.
func (r *Resolver) HoldsAssignCookie(req *http.Request) bool {
	_, ok := findCookie(req.Header, r.assignCookie)
	return ok
}

func (r *Resolver) postHogCookieValue(h http.Header) (string, bool) {
	if r.postHogCookie != "" {
		return findCookie(h, r.postHogCookie)
	}
	return findPostHogCookie(h)
}

// validID accepts non-empty UTF-8 ids without control characters, up to
// MaxIDLength bytes.
func validID(id string) bool {
	if id == "" || len(id) > MaxIDLength || !utf8.ValidString(id) {
		return false
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c < 0x20 || c == 0x7f {
			return false
		}
	}
	return true
}

// CookieOptions shape the cookie an assigned id is written to.
type CookieOptions struct {
	// Domain, when set, shares the cookie across subdomains (as posthog-js's
	// cross_subdomain_cookie does).
	Domain string
	// MaxAge is how long the browser keeps the id; posthog-js uses a year.
	MaxAge time.Duration
	// Secure marks the cookie HTTPS-only.
	Secure bool
}

// DefaultCookieMaxAge is posthog-js's cookie lifetime.
const DefaultCookieMaxAge = 365 * 24 * time.Hour

// Assign mints an identity (a UUIDv7, as posthog-js mints anonymous ids) and
// returns it with the cookie that makes it stick. With a project key the cookie
// is posthog-js's own, in its format, so posthog-js in the browser adopts the id
// and client-side flags agree with the proxy. It is not HttpOnly for that reason.
func (r *Resolver) Assign(opts CookieOptions) (Identity, *http.Cookie, error) {
	u, err := uuid.NewV7()
	if err != nil {
		return Identity{}, nil, fmt.Errorf("mint distinct id: %w", err)
	}
	id := u.String()
	value := id
	ident := Identity{DistinctID: id, Source: SourceAssigned}
	if r.assignCookie != AssignedCookieName {
		ident.DeviceID = id
		value = EncodePostHogCookie(PostHogState{DistinctID: id, DeviceID: id})
	}
	maxAge := opts.MaxAge
	if maxAge <= 0 {
		maxAge = DefaultCookieMaxAge
	}
	return ident, &http.Cookie{
		Name:     r.assignCookie,
		Value:    value,
		Path:     "/",
		Domain:   opts.Domain,
		MaxAge:   int(maxAge / time.Second),
		Secure:   opts.Secure,
		SameSite: http.SameSiteLaxMode,
	}, nil
}

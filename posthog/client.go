package posthog

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/flagsplit/flagsplit/eval"
)

// DefaultHost is PostHog Cloud US.
const DefaultHost = "https://us.i.posthog.com"

// DefaultTimeout bounds each definitions request (posthog-python uses 10 s).
const DefaultTimeout = 10 * time.Second

// MaxDefinitionsSize bounds a definitions response: the limit every
// definitions document is held to (eval.MaxDocumentSize). A longer answer is
// not read past the limit, and is an error.
const MaxDefinitionsSize = eval.MaxDocumentSize

// Client fetches flag definitions.
type Client struct {
	// Host is the PostHog instance, e.g. https://us.i.posthog.com or
	// https://eu.i.posthog.com, or a self-hosted URL.
	Host string
	// ProjectAPIKey is the project token (phc_...).
	ProjectAPIKey string
	// PersonalAPIKey authorises the request: a personal API key with
	// feature_flag:read (phx_...) or a project secret key (phs_...).
	PersonalAPIKey string
	// HTTPClient sends the requests; nil means a client with no overall
	// timeout (each request is bounded by Timeout).
	HTTPClient *http.Client
	// Timeout bounds each request. Default: DefaultTimeout.
	Timeout time.Duration
	// UserAgent identifies the caller to PostHog.
	UserAgent string
}

// Outcome is what a definitions request came back with.
type Outcome uint8

// Outcomes of a definitions request.
const (
	// Modified: new definitions in Body.
	Modified Outcome = iota
	// NotModified: 304, the stored ETag still matches; nothing to parse.
	NotModified
	// QuotaLimited: 402, the project is over its feature-flag quota. Every
	// PostHog SDK drops its definitions then.
	QuotaLimited
	// Unauthorized: 401 or 403, the key is wrong or lacks feature_flag:read.
	Unauthorized
)

var outcomeNames = [...]string{"modified", "not_modified", "quota_limited", "unauthorized"}

func (o Outcome) String() string {
	if int(o) < len(outcomeNames) {
		return outcomeNames[o]
	}
	return fmt.Sprintf("outcome(%d)", uint8(o))
}

// Response is the result of a definitions request that reached PostHog.
type Response struct {
	Outcome Outcome
	// StatusCode is the HTTP status.
	StatusCode int
	// Body holds the definitions JSON for Modified.
	Body []byte
	// ETag is the validator to send next time ("" when the server sent none
	// with a 200, which clears the stored one).
	ETag string
	// Detail is the error text PostHog returned, for Unauthorized and
	// QuotaLimited.
	Detail string
}

// StatusError is an answer that is neither usable nor one of the outcomes
// above (5xx, 429, other 4xx): worth retrying later.
type StatusError struct {
	StatusCode int
	Body       string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("PostHog answered %d %s: %s", e.StatusCode, http.StatusText(e.StatusCode), e.Body)
}

// DocumentError is a 200 whose body is not a usable definitions document:
// not JSON, no list of flags (`{}`, `{"flags": null}`), or over one of eval's
// limits (then Err is an *eval.LimitError). Worth retrying later; the last
// good definitions stay.
type DocumentError struct {
	StatusCode int
	Err        error
}

func (e *DocumentError) Error() string {
	return fmt.Sprintf("PostHog answered %d with unusable definitions: %v", e.StatusCode, e.Err)
}

func (e *DocumentError) Unwrap() error { return e.Err }

// DefinitionsURL is the endpoint the client polls.
func (c *Client) DefinitionsURL() (string, error) {
	host := strings.TrimRight(strings.TrimSpace(c.Host), "/")
	if host == "" {
		host = DefaultHost
	}
	u, err := url.Parse(host)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return "", fmt.Errorf("posthog host %q is not an absolute URL", c.Host)
	}
	q := url.Values{"token": {c.ProjectAPIKey}}
	// send_cohorts has to be present (its value does not matter); without it
	// PostHog rewrites single-cohort flags into property filters.
	return host + "/flags/definitions?" + q.Encode() + "&send_cohorts", nil
}

// FetchDefinitions asks for the definitions, sending etag as If-None-Match.
// It returns an error for transport failures, timeouts, answers to retry
// (*StatusError) and 200s that carry no usable definitions (*DocumentError).
func (c *Client) FetchDefinitions(ctx context.Context, etag string) (Response, error) {
	if c.ProjectAPIKey == "" || c.PersonalAPIKey == "" {
		return Response{}, errors.New("posthog: project_api_key and personal_api_key are required")
	}
	endpoint, err := c.DefinitionsURL()
	if err != nil {
		return Response{}, err
	}
	timeout := c.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, endpoint, nil)
	if err != nil {
		return Response{}, fmt.Errorf("posthog: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+c.PersonalAPIKey)
	req.Header.Set("Accept", "application/json")
	if c.UserAgent != "" {
		req.Header.Set("User-Agent", c.UserAgent)
	}
	if etag != "" {
		req.Header.Set("If-None-Match", etag)
	}
	hc := c.HTTPClient
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return Response{}, fmt.Errorf("posthog: fetching definitions: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxDefinitionsSize+1))
	if err != nil {
		return Response{}, fmt.Errorf("posthog: reading definitions: %w", err)
	}
	out := Response{StatusCode: resp.StatusCode, ETag: resp.Header.Get("ETag")}
	switch {
	case resp.StatusCode == http.StatusOK:
		// An answer without a list of flags, or over a limit, is refused
		// here, so that no consumer can take it for a project without flags.
		if err := eval.CheckDocument(body); err != nil {
			return Response{}, &DocumentError{StatusCode: resp.StatusCode, Err: err}
		}
		out.Outcome, out.Body = Modified, body
	case resp.StatusCode == http.StatusNotModified:
		out.Outcome = NotModified
		if out.ETag == "" {
			out.ETag = etag
		}
	case resp.StatusCode == http.StatusPaymentRequired:
		out.Outcome, out.Detail = QuotaLimited, snippet(body)
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		out.Outcome, out.Detail = Unauthorized, snippet(body)
	default:
		return Response{}, &StatusError{StatusCode: resp.StatusCode, Body: snippet(body)}
	}
	return out, nil
}

func snippet(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return s
}

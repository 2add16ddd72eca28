package posthog

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// MaxFlagsResponseSize bounds an answer of the /flags endpoint.
const MaxFlagsResponseSize = 4 << 20

// FlagsURL is PostHog's flags endpoint, in the version whose answer carries
// per-flag details.
func (c *Client) FlagsURL() (string, error) {
	host := strings.TrimRight(strings.TrimSpace(c.Host), "/")
	if host == "" {
		host = DefaultHost
	}
	if _, err := c.DefinitionsURL(); err != nil {
		return "", err
	}
	return host + "/flags/?v=2", nil
}

// Flags sends a flags request (the JSON body posthog-js sends) to PostHog's
// /flags endpoint and returns its answer. forwardedFor, when set, is sent as
// X-Forwarded-For so that PostHog resolves GeoIP properties for the visitor,
// not for this proxy. Any status but 200 is an error (*StatusError).
func (c *Client) Flags(ctx context.Context, body []byte, forwardedFor string) ([]byte, error) {
	endpoint, err := c.FlagsURL()
	if err != nil {
		return nil, err
	}
	timeout := c.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("posthog: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	if c.UserAgent != "" {
		req.Header.Set("User-Agent", c.UserAgent)
	}
	if forwardedFor != "" {
		req.Header.Set("X-Forwarded-For", forwardedFor)
	}
	hc := c.HTTPClient
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("posthog: asking for flags: %w", err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(io.LimitReader(resp.Body, MaxFlagsResponseSize+1))
	if err != nil {
		return nil, fmt.Errorf("posthog: reading flags: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, &StatusError{StatusCode: resp.StatusCode, Body: snippet(out)}
	}
	if len(out) > MaxFlagsResponseSize {
		return nil, fmt.Errorf("posthog: flags answer larger than %d bytes", MaxFlagsResponseSize)
	}
	return out, nil
}

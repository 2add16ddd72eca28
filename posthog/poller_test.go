package posthog

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/posthog/posthogtest"
)

const (
	projectKey  = "phc_test_project"
	personalKey = "phx_test_personal"
	defsV1      = `{"flags":[{"key":"a","active":true,"filters":{"groups":[{"rollout_percentage":100}]}}],"group_type_mapping":{},"cohorts":{}}`
	defsV2      = `{"flags":[{"key":"a","active":false,"filters":{"groups":[]}}],"group_type_mapping":{},"cohorts":{}}`
)

func newClient(srv *posthogtest.Server) *Client {
	return &Client{Host: srv.URL + "/", ProjectAPIKey: projectKey, PersonalAPIKey: personalKey, Timeout: time.Second, UserAgent: "flagsplit-test"}
}

func TestFetchSpeaksTheDefinitionsEndpoint(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	c := newClient(srv)

	resp, err := c.FetchDefinitions(context.Background(), "")
	if err != nil || resp.Outcome != Modified || string(resp.Body) != defsV1 || resp.ETag != srv.ETag() {
		t.Fatalf("first fetch: %+v %v", resp, err)
	}
	reqs := srv.Requests()
	if r := reqs[0]; r.Path != "/flags/definitions" || r.Token != projectKey || !r.SendCohorts || r.Authorization != "Bearer "+personalKey {
		t.Errorf("request %+v", r)
	}

	resp, err = c.FetchDefinitions(context.Background(), resp.ETag)
	if err != nil || resp.Outcome != NotModified || resp.Body != nil || resp.ETag != srv.ETag() {
		t.Fatalf("revalidation: %+v %v", resp, err)
	}
	if got := srv.Requests()[1].IfNoneMatch; got != srv.ETag() {
		t.Errorf("If-None-Match %q, want the stored weak ETag %q", got, srv.ETag())
	}

	srv.SetDefinitions([]byte(defsV2))
	if resp, err = c.FetchDefinitions(context.Background(), resp.ETag); err != nil || resp.Outcome != Modified || string(resp.Body) != defsV2 {
		t.Fatalf("after a change: %+v %v", resp, err)
	}
}

func TestFetchClassifiesFailures(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	c := newClient(srv)
	ctx := context.Background()

	srv.FailWith(http.StatusPaymentRequired)
	if resp, err := c.FetchDefinitions(ctx, ""); err != nil || resp.Outcome != QuotaLimited || !strings.Contains(resp.Detail, "quota") {
		t.Errorf("402: %+v %v", resp, err)
	}
	srv.FailWith(http.StatusForbidden)
	if resp, err := c.FetchDefinitions(ctx, ""); err != nil || resp.Outcome != Unauthorized || resp.StatusCode != 403 {
		t.Errorf("403: %+v %v", resp, err)
	}
	srv.FailWith(0)
	bad := *c
	bad.PersonalAPIKey = "phx_wrong"
	if resp, err := bad.FetchDefinitions(ctx, ""); err != nil || resp.Outcome != Unauthorized || resp.StatusCode != 401 {
		t.Errorf("wrong key: %+v %v", resp, err)
	}
	for _, status := range []int{500, 502, 429, 404} {
		srv.FailWith(status)
		var se *StatusError
		if _, err := c.FetchDefinitions(ctx, ""); !errors.As(err, &se) || se.StatusCode != status {
			t.Errorf("%d: %v", status, err)
		}
	}
	srv.FailWith(0)
	srv.Stall(2 * time.Second)
	start := time.Now()
	if _, err := c.FetchDefinitions(ctx, ""); err == nil || time.Since(start) > 1900*time.Millisecond {
		t.Errorf("a stalled server: err %v after %v (timeout 1s)", err, time.Since(start))
	}
	srv.Stall(0)
	if _, err := (&Client{Host: "not a url", ProjectAPIKey: "a", PersonalAPIKey: "b"}).FetchDefinitions(ctx, ""); err == nil {
		t.Error("a bad host was accepted")
	}
	if _, err := (&Client{Host: srv.URL}).FetchDefinitions(ctx, ""); err == nil {
		t.Error("missing keys were accepted")
	}
}

// recorder collects what a poller reports.
type recorder struct {
	mu          sync.Mutex
	bodies      []string
	notModified int
	quota       int
	unauth      []int
	failures    []time.Duration
	reject      bool
	etag        string // the validator of the definitions taken
}

func (r *recorder) handlers() Handlers {
	return Handlers{
		Definitions: func(body []byte, etag string) error {
			r.mu.Lock()
			defer r.mu.Unlock()
			if r.reject {
				return errors.New("unusable definitions")
			}
			r.bodies = append(r.bodies, string(body))
			r.etag = etag
			return nil
		},
		NotModified:  func(etag string) { r.mu.Lock(); r.notModified++; r.etag = etag; r.mu.Unlock() },
		QuotaLimited: func(string) { r.mu.Lock(); r.quota++; r.etag = ""; r.mu.Unlock() },
		Unauthorized: func(status int, _ string) { r.mu.Lock(); r.unauth = append(r.unauth, status); r.mu.Unlock() },
		Failure: func(_ error, _ int, retry time.Duration) {
			r.mu.Lock()
			r.failures = append(r.failures, retry)
			r.mu.Unlock()
		},
	}
}

func (r *recorder) snapshot() recorder {
	r.mu.Lock()
	defer r.mu.Unlock()
	return recorder{bodies: append([]string(nil), r.bodies...), notModified: r.notModified, quota: r.quota,
		unauth: append([]int(nil), r.unauth...), failures: append([]time.Duration(nil), r.failures...), etag: r.etag}
}

// validator is the ETag of the definitions the recorder took.
func (r *recorder) validator() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.etag
}

func (r *recorder) setValidator(etag string) {
	r.mu.Lock()
	r.etag = etag
	r.mu.Unlock()
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestPollerPicksUpChangesAndRevalidatesCheaply(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	rec := &recorder{}
	p := &Poller{Client: newClient(srv), Handlers: rec.handlers(), Validator: rec.validator, Interval: 10 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Run(ctx); close(done) }()

	eventually(t, "several 304s", func() bool { return rec.snapshot().notModified >= 5 })
	if got := rec.snapshot().bodies; len(got) != 1 || srv.Served() != 1 {
		t.Fatalf("unchanged definitions were handed over %d times (served %d)", len(got), srv.Served())
	}
	srv.SetDefinitions([]byte(defsV2))
	eventually(t, "the change", func() bool { return len(rec.snapshot().bodies) == 2 })
	if rec.snapshot().bodies[1] != defsV2 || rec.validator() != srv.ETag() {
		t.Errorf("got %q with ETag %q", rec.snapshot().bodies[1], rec.validator())
	}
	cancel()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

func TestPollerBacksOffAndRecovers(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	rec := &recorder{}
	p := &Poller{Client: newClient(srv), Handlers: rec.handlers(), Validator: rec.validator, Interval: 10 * time.Millisecond, MaxBackoff: 40 * time.Millisecond}
	srv.FailWith(http.StatusInternalServerError)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go p.Run(ctx)
	eventually(t, "five failures", func() bool { return len(rec.snapshot().failures) >= 5 })
	f := rec.snapshot().failures
	// interval, 2x, 4x, then capped at 40ms; each ±10 %.
	for i, want := range []time.Duration{10, 20, 40, 40, 40} {
		want *= time.Millisecond
		if f[i] < want*9/10 || f[i] > want*11/10 {
			t.Errorf("retry %d after %v, want about %v", i+1, f[i], want)
		}
	}
	if len(rec.snapshot().bodies) != 0 {
		t.Error("a failed fetch handed over definitions")
	}
	srv.FailWith(0)
	eventually(t, "recovery", func() bool { return len(rec.snapshot().bodies) == 1 })
}

func TestPollerOutcomes(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	rec := &recorder{}
	p := &Poller{Client: newClient(srv), Handlers: rec.handlers()}
	ctx := context.Background()

	if o, err := p.Refresh(ctx); err != nil || o != Modified {
		t.Fatalf("refresh: %v %v", o, err)
	}
	etag := rec.validator()
	srv.FailWith(http.StatusPaymentRequired)
	if o, err := p.Refresh(ctx); err != nil || o != QuotaLimited || rec.snapshot().quota != 1 || rec.validator() != "" {
		t.Errorf("402: %v %v, etag %q", o, err, rec.validator())
	}
	srv.FailWith(http.StatusUnauthorized)
	if o, err := p.Refresh(ctx); err != nil || o != Unauthorized || len(rec.snapshot().unauth) != 1 {
		t.Errorf("401: %v %v", o, err)
	}
	// Unusable definitions: reported as a failure, the ETag is not kept, so
	// the next poll fetches them again.
	srv.FailWith(0)
	rec.setValidator(etag)
	srv.SetDefinitions([]byte(defsV2))
	rec.mu.Lock()
	rec.reject = true
	rec.mu.Unlock()
	if _, err := p.Refresh(ctx); err == nil || rec.validator() != etag {
		t.Errorf("rejected definitions: err %v, etag %q (was %q)", err, rec.validator(), etag)
	}
	rec.mu.Lock()
	rec.reject = false
	rec.mu.Unlock()
	if o, err := p.Refresh(ctx); err != nil || o != Modified || rec.validator() != srv.ETag() {
		t.Errorf("after rejection: %v %v", o, err)
	}
}

// A 200 that carries no list of flags, or is over a limit, is a failed
// attempt: it never reaches Definitions, the validator of the last good
// definitions stays (so the next poll asks again), and the poller backs off.
// An explicit empty list is a project without flags, and is taken.
func TestPollerRefusesAnswersWithoutUsableDefinitions(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	rec := &recorder{}
	client := newClient(srv)
	// Reading 32 MiB under the race detector can take longer than the
	// other tests' one second.
	client.Timeout = time.Minute
	p := &Poller{Client: client, Handlers: rec.handlers(), Validator: rec.validator}
	ctx := context.Background()
	if o, err := p.Refresh(ctx); err != nil || o != Modified {
		t.Fatalf("first refresh: %v %v", o, err)
	}
	good := rec.validator()

	deep := `{"flags": [], "cohorts": {"1": ` + strings.Repeat(`{"type":"AND","values":[`, eval.MaxDepth) + `{}` + strings.Repeat(`]}`, eval.MaxDepth) + `}}`
	huge := `{"flags": [], "pad": "` + strings.Repeat("x", eval.MaxDocumentSize) + `"}`
	for _, tc := range []struct{ name, body, want, limit string }{
		{"an empty object", `{}`, `no "flags" list`, ""},
		{"null flags", `{"flags": null}`, `"flags" is null`, ""},
		{"flags as an object", `{"flags": {}}`, `"flags" is an object`, ""},
		{"flags as a string", `{"flags": "[]", "group_type_mapping": {}}`, `"flags" is a string`, ""},
		{"not JSON", `<html>gateway</html>`, "not a JSON object", ""},
		{"nested too deeply", deep, fmt.Sprintf("limit of %d levels", eval.MaxDepth), "depth"},
		{"too large", huge, fmt.Sprintf("limit of %d bytes", eval.MaxDocumentSize), "size"},
	} {
		srv.SetDefinitions([]byte(tc.body))
		failures := len(rec.snapshot().failures)
		_, err := p.Refresh(ctx)
		var de *DocumentError
		if !errors.As(err, &de) || de.StatusCode != http.StatusOK || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want a DocumentError saying %q", tc.name, err, tc.want)
		}
		var le *eval.LimitError
		if tc.limit != "" && (!errors.As(err, &le) || le.Limit != tc.limit) {
			t.Errorf("%s: error %v, want the %s limit", tc.name, err, tc.limit)
		}
		snap := rec.snapshot()
		if len(snap.bodies) != 1 || len(snap.failures) != failures+1 || rec.validator() != good {
			t.Errorf("%s: handed over %d bodies, %d new failures, validator %q (want %q)",
				tc.name, len(snap.bodies)-1, len(snap.failures)-failures, rec.validator(), good)
		}
	}

	srv.SetDefinitions([]byte(`{"flags": [], "group_type_mapping": {}, "cohorts": {}}`))
	if o, err := p.Refresh(ctx); err != nil || o != Modified {
		t.Fatalf("an empty list of flags: %v %v", o, err)
	}
	if b := rec.snapshot().bodies; len(b) != 2 || b[1] != `{"flags": [], "group_type_mapping": {}, "cohorts": {}}` || rec.validator() != srv.ETag() {
		t.Errorf("an empty list of flags was not taken: %q, validator %q", b, rec.validator())
	}
}

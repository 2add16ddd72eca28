// Package posthogtest provides a stand-in PostHog server for tests: it serves
// /flags/definitions with the real endpoint's shapes, status codes and weak
// ETags, accepts events on /batch/ (gzip or plain JSON), and can be told to
// fail, stall or run out of quota.
package posthogtest

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"time"
)

// Server is a stand-in PostHog instance.
type Server struct {
	*httptest.Server
	ProjectAPIKey  string
	PersonalAPIKey string

	mu       sync.Mutex
	body     []byte
	etag     string
	status   int // forced status, 0 = normal behaviour
	delay    time.Duration
	requests []Request

	served      atomic.Int64 // 200s
	notModified atomic.Int64 // 304s

	batchStatus   int // forced status for /batch/, 0 = accept
	batchAttempts atomic.Int64
	events        []CapturedEvent
	batches       int

	batchFailNext   int           // how many more /batch/ requests answer batchFailStatus
	batchFailStatus int           // status for them
	batchDelay      time.Duration // wait before answering /batch/
	batchBlock      chan struct{} // when non-nil, /batch/ waits until it is closed
	batchInFlight   atomic.Int64
	batchMaxFlight  atomic.Int64
	batchAbandoned  atomic.Int64
}

// CapturedEvent is an event received on /batch/.
type CapturedEvent struct {
	APIKey     string         `json:"-"`
	Event      string         `json:"event"`
	DistinctID string         `json:"distinct_id"`
	Properties map[string]any `json:"properties"`
	Timestamp  string         `json:"timestamp"`
	UUID       string         `json:"uuid"`
}

// Request is what the server saw of one request.
type Request struct {
	Path          string
	Token         string
	SendCohorts   bool
	Authorization string
	IfNoneMatch   string
	Status        int
}

// New starts a server with the given keys and definitions body.
func New(projectKey, personalKey string, definitions []byte) *Server {
	s := &Server{ProjectAPIKey: projectKey, PersonalAPIKey: personalKey}
	s.SetDefinitions(definitions)
	s.Server = httptest.NewServer(http.HandlerFunc(s.serve))
	return s
}

// SetDefinitions changes the definitions (and so the ETag).
func (s *Server) SetDefinitions(body []byte) {
	sum := sha256.Sum256(body)
	s.mu.Lock()
	s.body = append([]byte(nil), body...)
	s.etag = fmt.Sprintf(`W/"%x"`, sum[:16])
	s.mu.Unlock()
}

// ETag returns the current validator.
func (s *Server) ETag() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.etag
}

// FailWith makes every request answer status (0 restores normal answers).
// 402 answers with PostHog's quota_limited body, 401/403 with its
// authentication error body.
func (s *Server) FailWith(status int) {
	s.mu.Lock()
	s.status = status
	s.mu.Unlock()
}

// Stall delays every answer by d (to exercise client timeouts).
func (s *Server) Stall(d time.Duration) {
	s.mu.Lock()
	s.delay = d
	s.mu.Unlock()
}

// Requests returns what the server has seen.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.requests...)
}

// Served counts 200 answers with a body; NotModified counts 304s.
func (s *Server) Served() int64      { return s.served.Load() }
func (s *Server) NotModified() int64 { return s.notModified.Load() }

// FailBatchesWith makes /batch/ answer status (0 accepts again).
func (s *Server) FailBatchesWith(status int) {
	s.mu.Lock()
	s.batchStatus = status
	s.mu.Unlock()
}

// Events returns the events received so far, and how many batches carried them.
func (s *Server) Events() ([]CapturedEvent, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]CapturedEvent(nil), s.events...), s.batches
}

// BatchAttempts returns how many /batch/ requests arrived, accepted or not.
func (s *Server) BatchAttempts() int64 { return s.batchAttempts.Load() }

// FailNextBatches makes the next n /batch/ requests answer status; the ones
// after them are answered as before.
func (s *Server) FailNextBatches(n, status int) {
	s.mu.Lock()
	s.batchFailNext, s.batchFailStatus = n, status
	s.mu.Unlock()
}

// SetBatchDelay makes each /batch/ request wait d before it is answered (0:
// answer at once). A request whose client gives up stops waiting.
func (s *Server) SetBatchDelay(d time.Duration) {
	s.mu.Lock()
	s.batchDelay = d
	s.mu.Unlock()
}

// BlockBatches holds every /batch/ request, from now on and until release is
// called, before answering it. Release is idempotent and must be called
// before Close (which waits for the requests under way). A request whose
// client gives up stops waiting.
func (s *Server) BlockBatches() (release func()) {
	ch := make(chan struct{})
	s.mu.Lock()
	s.batchBlock = ch
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			if s.batchBlock == ch {
				s.batchBlock = nil
			}
			s.mu.Unlock()
			close(ch)
		})
	}
}

// BatchesInFlight returns how many /batch/ requests are being handled now
// (waiting on SetBatchDelay or BlockBatches included).
func (s *Server) BatchesInFlight() int64 { return s.batchInFlight.Load() }

// MaxBatchesInFlight returns the most /batch/ requests handled at once so far.
func (s *Server) MaxBatchesInFlight() int64 { return s.batchMaxFlight.Load() }

// BatchesAbandoned returns how many /batch/ requests their client gave up
// (cancelled, timed out, closed the connection) while they waited on
// SetBatchDelay or BlockBatches.
func (s *Server) BatchesAbandoned() int64 { return s.batchAbandoned.Load() }

func (s *Server) serveBatch(w http.ResponseWriter, r *http.Request) {
	s.batchAttempts.Add(1)
	n := s.batchInFlight.Add(1)
	defer s.batchInFlight.Add(-1)
	for {
		m := s.batchMaxFlight.Load()
		if n <= m || s.batchMaxFlight.CompareAndSwap(m, n) {
			break
		}
	}
	s.mu.Lock()
	forced, delay, block := s.batchStatus, s.batchDelay, s.batchBlock
	if s.batchFailNext > 0 {
		s.batchFailNext--
		forced = s.batchFailStatus
	}
	s.mu.Unlock()
	// The body is read before waiting, as a real server reads it: only then
	// does net/http watch the connection and cancel r.Context() when the
	// client gives up.
	raw, err := io.ReadAll(r.Body)
	if err != nil {
		return
	}
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			s.batchAbandoned.Add(1)
			return
		}
	}
	if block != nil {
		select {
		case <-block:
		case <-r.Context().Done():
			s.batchAbandoned.Add(1)
			return
		}
	}
	if forced != 0 {
		w.WriteHeader(forced)
		fmt.Fprintf(w, `{"type":"server_error","detail":"forced %d"}`, forced)
		return
	}
	var body io.Reader = bytes.NewReader(raw)
	if r.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(body)
		if err != nil {
			http.Error(w, `{"detail":"bad gzip"}`, http.StatusBadRequest)
			return
		}
		body = zr
	}
	var payload struct {
		APIKey string          `json:"api_key"`
		Batch  []CapturedEvent `json:"batch"`
	}
	if err := json.NewDecoder(body).Decode(&payload); err != nil || payload.APIKey != s.ProjectAPIKey {
		http.Error(w, `{"detail":"bad batch or api_key"}`, http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	for _, e := range payload.Batch {
		e.APIKey = payload.APIKey
		s.events = append(s.events, e)
	}
	s.batches++
	s.mu.Unlock()
	fmt.Fprint(w, `{"status":"Ok"}`)
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/batch/" && r.Method == http.MethodPost {
		s.serveBatch(w, r)
		return
	}
	s.mu.Lock()
	body, etag, forced, delay := s.body, s.etag, s.status, s.delay
	s.mu.Unlock()
	req := Request{Path: r.URL.Path, Token: r.URL.Query().Get("token"), SendCohorts: r.URL.Query().Has("send_cohorts"),
		Authorization: r.Header.Get("Authorization"), IfNoneMatch: r.Header.Get("If-None-Match")}
	record := func(status int) {
		req.Status = status
		s.mu.Lock()
		s.requests = append(s.requests, req)
		s.mu.Unlock()
	}
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			record(0)
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	switch {
	case r.URL.Path != "/flags/definitions":
		record(http.StatusNotFound)
		http.Error(w, `{"type":"invalid_request","code":"not_found","detail":"Not found."}`, http.StatusNotFound)
		return
	case forced == http.StatusPaymentRequired:
		record(forced)
		w.WriteHeader(forced)
		fmt.Fprint(w, `{"type":"quota_limited","detail":"You have exceeded your feature flag request quota","code":"payment_required"}`)
		return
	case forced == http.StatusUnauthorized || forced == http.StatusForbidden ||
		r.Header.Get("Authorization") != "Bearer "+s.PersonalAPIKey || req.Token != s.ProjectAPIKey:
		status := forced
		if status == 0 {
			status = http.StatusUnauthorized
		}
		record(status)
		w.WriteHeader(status)
		fmt.Fprint(w, `{"type":"authentication_error","code":"authentication_failed","detail":"Incorrect authentication credentials."}`)
		return
	case forced != 0:
		record(forced)
		w.WriteHeader(forced)
		fmt.Fprintf(w, `{"type":"server_error","detail":"forced %d"}`, forced)
		return
	}
	w.Header().Set("Cache-Control", "private, must-revalidate")
	w.Header().Set("ETag", etag)
	if match := r.Header.Get("If-None-Match"); match != "" && (match == etag || "W/"+match == etag) {
		record(http.StatusNotModified)
		s.notModified.Add(1)
		w.WriteHeader(http.StatusNotModified)
		return
	}
	record(http.StatusOK)
	s.served.Add(1)
	w.Write(body)
}

package posthog

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Event is one event for PostHog's capture endpoint.
type Event struct {
	Event      string         `json:"event"`
	DistinctID string         `json:"distinct_id"`
	Properties map[string]any `json:"properties"`
	Timestamp  time.Time      `json:"timestamp"`
	UUID       string         `json:"uuid,omitempty"`
}

// Defaults for the event sender.
const (
	DefaultQueueSize     = 10000
	DefaultBatchSize     = 100
	DefaultFlushInterval = time.Second
	DefaultMaxRetries    = 3
)

// Sender delivers events to PostHog's /batch/ endpoint: a bounded queue that
// never blocks the caller, batches, gzip, retries with back-off. What it cannot
// deliver it counts as dropped: every accepted event ends as sent or dropped,
// once.
//
// The sender owns its one delivery loop (Start), so that whoever hands it
// events (the configs of a Caddy reload, one after another) never competes
// with another loop for the queue, and no batch changes hands. Flush makes the
// loop send what is queued now; Close stops it.
type Sender struct {
	// Host and ProjectAPIKey address the project.
	Host          string
	ProjectAPIKey string
	// HTTPClient sends the batches; nil means http.DefaultClient.
	HTTPClient *http.Client
	// Timeout bounds each request. Default: DefaultTimeout.
	Timeout time.Duration
	// BatchSize is the most events per request. Default: DefaultBatchSize.
	BatchSize int
	// FlushInterval is the longest an event waits for a full batch.
	FlushInterval time.Duration
	// MaxRetries is how many times a failed batch is retried (with back-off
	// from RetryBackoff, doubling) before its events are dropped.
	MaxRetries   int
	RetryBackoff time.Duration
	// UserAgent identifies the sender.
	UserAgent string
	// Sent and Dropped are told how many events were delivered or given up
	// (queue full, refused by PostHog, retries exhausted, closed, shutdown).
	Sent    func(n int)
	Dropped func(n int, reason string)

	queue chan Event
	// pending counts the events accepted and not yet sent or dropped.
	pending atomic.Int64

	// gate orders Enqueue against Close: once Close holds it, no event can
	// slip into the queue behind its last drain.
	gate   sync.RWMutex
	closed bool

	mu sync.Mutex // guards the fields below
	// started: Start ran; running: the loop was started and has not been
	// told to stop.
	started, running bool
	// held are events taken from the queue and not yet delivered, kept in
	// order for whoever delivers next (the loop hands its partial batch
	// back here when it stops; a direct flush its unsent rest).
	held []Event
	// abandoned: Close gave up waiting for the loop, which then drops what
	// it still has when it finally exits.
	abandoned bool
	flushes   chan chan struct{}
	stop      chan struct{}
	done      chan struct{}
	// direct serialises deliveries made without the loop.
	direct sync.Mutex
}

// NewSender returns a sender with a queue of queueSize events (0: the default).
// Set its fields before Start.
func NewSender(host, projectKey string, queueSize int) *Sender {
	if queueSize <= 0 {
		queueSize = DefaultQueueSize
	}
	return &Sender{Host: host, ProjectAPIKey: projectKey, queue: make(chan Event, queueSize),
		flushes: make(chan chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
}

// Enqueue queues an event without blocking; it reports false (and counts the
// event as dropped) when the queue is full or the sender is closed.
func (s *Sender) Enqueue(e Event) bool {
	s.gate.RLock()
	defer s.gate.RUnlock()
	if s.closed {
		s.drop(1, "closed")
		return false
	}
	s.pending.Add(1)
	select {
	case s.queue <- e:
		return true
	default:
		s.pending.Add(-1)
		s.drop(1, "queue_full")
		return false
	}
}

// Pending counts the events accepted and not yet delivered or dropped: queued,
// in the loop's partial batch, or in a delivery under way.
func (s *Sender) Pending() int { return int(s.pending.Load()) }

// Start starts the delivery loop. Idempotent; a closed sender stays closed.
func (s *Sender) Start() {
	s.gate.RLock()
	defer s.gate.RUnlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started || s.closed {
		return
	}
	s.started, s.running = true, true
	// A direct flush in progress finishes before the loop delivers.
	go func() {
		s.direct.Lock()
		s.direct.Unlock()
		s.loop()
	}()
}

// Flush delivers now every event enqueued before the call, the loop's partial
// batch included, without waiting for FlushInterval or a full batch. It returns
// once they are delivered (or dropped after their retries) or when ctx is
// done, and never later than ctx's deadline, however fast events keep
// arriving: events enqueued after the call are not its business. What it could
// not send by then is not lost; the sender goes on sending it.
func (s *Sender) Flush(ctx context.Context) error {
	s.mu.Lock()
	switch {
	case !s.started:
		// No loop to ask: deliver here. The delivery lock is taken before
		// Start can see that the loop may run, so the two never overlap.
		s.direct.Lock()
		s.mu.Unlock()
		defer s.direct.Unlock()
		return s.deliverDirectLocked(ctx, "")
	case !s.running:
		s.mu.Unlock()
		return nil // closing: Close delivers what is left
	}
	s.mu.Unlock()
	done := make(chan struct{})
	select {
	case s.flushes <- done:
	case <-s.done:
		return nil // closed meanwhile: Close delivers the rest
	case <-ctx.Done():
		return fmt.Errorf("flushing events: %w", ctx.Err())
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("flushing events: %w", ctx.Err())
	}
}

// Close stops the loop and delivers what remains within ctx; what is still
// undelivered at ctx's deadline is counted as dropped ("shutdown"). Later
// events are dropped as "closed". Idempotent.
func (s *Sender) Close(ctx context.Context) error {
	s.gate.Lock()
	already := s.closed
	s.closed = true
	s.gate.Unlock()
	if already {
		return nil
	}
	s.mu.Lock()
	running := s.running
	s.running = false
	s.mu.Unlock()
	if running {
		close(s.stop)
		select {
		case <-s.done:
		case <-ctx.Done():
			s.mu.Lock()
			s.abandoned = true
			s.mu.Unlock()
			return fmt.Errorf("closing the event sender: %w", ctx.Err())
		}
	}
	s.direct.Lock()
	defer s.direct.Unlock()
	return s.deliverDirectLocked(ctx, "shutdown")
}

// loop is the one delivery loop.
func (s *Sender) loop() {
	defer close(s.done)
	s.mu.Lock()
	batch := append(make([]Event, 0, s.batchSize()), s.held...)
	s.held = nil
	s.mu.Unlock()
	interval := s.FlushInterval
	if interval <= 0 {
		interval = DefaultFlushInterval
	}
	timer := time.NewTimer(interval)
	defer timer.Stop()
	// deliver sends batch; it reports false when told to stop meanwhile,
	// with what it could not send handed back.
	deliver := func() bool {
		for len(batch) > 0 {
			n := min(len(batch), s.batchSize())
			if !s.deliver(context.Background(), batch[:n], s.stop) {
				s.handBack(batch)
				return false
			}
			batch = batch[n:]
		}
		batch = batch[:0:0]
		return true
	}
	for {
		select {
		case <-s.stop:
			s.handBack(batch)
			return
		case e := <-s.queue:
			if len(batch) == 0 {
				timer.Reset(interval)
			}
			batch = append(batch, e)
			if len(batch) < s.batchSize() {
				continue
			}
		case <-timer.C:
			if len(batch) == 0 {
				continue
			}
		case done := <-s.flushes:
			// Everything queued now, behind the partial batch.
			for n := len(s.queue); n > 0; n-- {
				batch = append(batch, <-s.queue)
			}
			ok := deliver()
			close(done)
			if !ok {
				return
			}
			continue
		}
		if !deliver() {
			return
		}
	}
}

// handBack keeps events the loop could not deliver; when Close no longer
// waits for them, they are dropped.
func (s *Sender) handBack(events []Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.abandoned {
		s.drop(len(events)+len(s.held), "shutdown")
		s.held = nil
		for n := len(s.queue); n > 0; n-- {
			<-s.queue
			s.drop(1, "shutdown")
		}
		return
	}
	s.held = append(append([]Event(nil), events...), s.held...)
}

// deliverDirectLocked delivers the held events and a snapshot of the queue in
// the caller's goroutine, bounded by ctx (no loop is running; the caller holds
// s.direct). What is left at the deadline is dropped with reason dropReason,
// or kept when it is "".
func (s *Sender) deliverDirectLocked(ctx context.Context, dropReason string) error {
	s.mu.Lock()
	batch := s.held
	s.held = nil
	s.mu.Unlock()
	for n := len(s.queue); n > 0; n-- {
		batch = append(batch, <-s.queue)
	}
	if dropReason != "" {
		// Closed: nothing more can arrive, take everything.
		for len(s.queue) > 0 {
			batch = append(batch, <-s.queue)
		}
	}
	for len(batch) > 0 {
		if ctx.Err() != nil {
			break
		}
		n := min(len(batch), s.batchSize())
		if !s.deliver(ctx, batch[:n], ctx.Done()) {
			break
		}
		batch = batch[n:]
	}
	if len(batch) == 0 {
		return nil
	}
	if dropReason != "" {
		s.drop(len(batch), dropReason)
	} else {
		s.mu.Lock()
		s.held = append(batch, s.held...)
		s.mu.Unlock()
	}
	return fmt.Errorf("delivering events: %w", context.Cause(ctx))
}

func (s *Sender) batchSize() int {
	if s.BatchSize > 0 {
		return s.BatchSize
	}
	return DefaultBatchSize
}

// deliver posts one batch, retrying transient failures with back-off, and
// reports whether the batch is done with (sent, or dropped: refused by
// PostHog, retries exhausted, unencodable). It reports false, keeping the
// batch, when interrupt closes before that. postCtx bounds each request: the
// loop never cuts one short (PostHog may already have accepted it), only the
// wait before a retry; a direct delivery bounds it by its caller's deadline.
func (s *Sender) deliver(postCtx context.Context, batch []Event, interrupt <-chan struct{}) bool {
	body, err := s.encode(batch)
	if err != nil {
		s.drop(len(batch), "encoding")
		return true
	}
	backoff := s.RetryBackoff
	if backoff <= 0 {
		backoff = time.Second
	}
	retries := s.MaxRetries
	if retries < 0 {
		retries = 0
	} else if retries == 0 {
		retries = DefaultMaxRetries
	}
	for attempt := 0; ; attempt++ {
		err = s.post(postCtx, body)
		if err == nil {
			s.pending.Add(-int64(len(batch)))
			if s.Sent != nil {
				s.Sent(len(batch))
			}
			return true
		}
		select {
		case <-interrupt:
			return false
		default:
		}
		var se *StatusError
		if errors.As(err, &se) && se.StatusCode >= 400 && se.StatusCode < 500 && se.StatusCode != http.StatusTooManyRequests {
			s.drop(len(batch), "refused")
			return true
		}
		if attempt >= retries {
			s.drop(len(batch), "retries_exhausted")
			return true
		}
		wait := time.NewTimer(backoff)
		select {
		case <-wait.C:
		case <-interrupt:
			wait.Stop()
			return false
		}
		backoff *= 2
	}
}

// drop counts events given up; those accepted by Enqueue leave Pending.
func (s *Sender) drop(n int, reason string) {
	if reason != "queue_full" && reason != "closed" {
		s.pending.Add(-int64(n))
	}
	if s.Dropped != nil {
		s.Dropped(n, reason)
	}
}

func (s *Sender) encode(batch []Event) ([]byte, error) {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	err := json.NewEncoder(zw).Encode(struct {
		APIKey string    `json:"api_key"`
		Batch  []Event   `json:"batch"`
		SentAt time.Time `json:"sent_at"`
	}{s.ProjectAPIKey, batch, time.Now().UTC()})
	if err != nil {
		return nil, fmt.Errorf("encoding events: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("compressing events: %w", err)
	}
	return buf.Bytes(), nil
}

func (s *Sender) post(ctx context.Context, body []byte) error {
	timeout := s.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	host := strings.TrimRight(s.Host, "/")
	if host == "" {
		host = DefaultHost
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, host+"/batch/", bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("posthog events: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Content-Encoding", "gzip")
	if s.UserAgent != "" {
		req.Header.Set("User-Agent", s.UserAgent)
	}
	hc := s.HTTPClient
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("posthog events: %w", err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode/100 != 2 {
		return &StatusError{StatusCode: resp.StatusCode, Body: snippet(msg)}
	}
	return nil
}

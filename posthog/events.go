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
// deliver it counts as dropped: every accepted event is reported exactly once,
// to Sent or to Dropped.
//
// Once started, one delivery loop, owned by the sender, does every delivery;
// Flush asks it to send what is waiting, and Close stops it. A sender can so
// outlive the configurations that use it: it is started once and closed when
// the last one is done with it.
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
	// (queue_full, closed, refused by PostHog, retries_exhausted, shutdown).
	Sent    func(n int)
	Dropped func(n int, reason string)

	queue   chan Event
	pending atomic.Int64 // accepted, not yet reported to Sent or Dropped

	// gate orders Enqueue against Close: once closed is set, nothing more
	// enters the queue, so that Close's final count is complete.
	gate   sync.RWMutex
	closed bool

	// token is the right to deliver: whoever holds it (the loop, for its whole
	// life, a direct Flush before Start, or Close's final delivery) is the only
	// one posting batches.
	token chan struct{}
	// mu guards held and abandoned.
	mu sync.Mutex
	// held are events taken out of the queue and not resolved by a delivery
	// that had to stop (a deadline, Close); the next token holder sends them
	// first.
	held []Event
	// abandoned is set once Close has given up: what is handed back after it
	// is dropped ("shutdown").
	abandoned bool

	life         sync.Mutex // guards started and closeStarted
	started      bool
	closeStarted bool
	startedCh    chan struct{} // closed by Start
	closing      chan struct{} // closed when Close begins
	closeDone    chan struct{} // closed when Close returns
	done         chan struct{} // closed when the loop has exited
	flushReqs    chan *flushRequest
}

// flushRequest is a Flush waiting on the loop; err is set before done is
// closed.
type flushRequest struct {
	done chan struct{}
	err  error
}

var errClosed = errors.New("posthog events: sender closed")

// NewSender returns a sender with a queue of queueSize events (0: the default).
// Its configuration fields must be set before Start.
func NewSender(host, projectKey string, queueSize int) *Sender {
	if queueSize <= 0 {
		queueSize = DefaultQueueSize
	}
	return &Sender{
		Host: host, ProjectAPIKey: projectKey,
		queue:     make(chan Event, queueSize),
		token:     make(chan struct{}, 1),
		startedCh: make(chan struct{}),
		closing:   make(chan struct{}),
		closeDone: make(chan struct{}),
		done:      make(chan struct{}),
		flushReqs: make(chan *flushRequest),
	}
}

// Start starts the sender's delivery loop, which sends a batch when it is full
// or FlushInterval after its first event. Start is idempotent, and does
// nothing after Close. Before Start, Enqueue queues and Flush delivers in the
// caller's goroutine.
func (s *Sender) Start() {
	s.life.Lock()
	defer s.life.Unlock()
	if s.started || s.closeStarted {
		return
	}
	s.started = true
	close(s.startedCh)
	go s.run()
}

// Enqueue queues an event without ever blocking. It reports false, and counts
// the event as dropped, when the queue is full ("queue_full") or the sender is
// closed ("closed").
func (s *Sender) Enqueue(e Event) bool {
	s.gate.RLock()
	if s.closed {
		s.gate.RUnlock()
		s.drop(1, "closed")
		return false
	}
	s.pending.Add(1)
	select {
	case s.queue <- e:
		s.gate.RUnlock()
		return true
	default:
		s.pending.Add(-1)
		s.gate.RUnlock()
		s.drop(1, "queue_full")
		return false
	}
}

// Pending returns the number of events accepted and not yet delivered or
// dropped: queued, waiting in the loop's batch, or in a delivery under way.
func (s *Sender) Pending() int { return int(s.pending.Load()) }

// queued returns the number of events in the queue itself.
func (s *Sender) queued() int { return len(s.queue) }

// Flush delivers now every event enqueued before the call, the loop's partial
// batch included, without waiting for FlushInterval or a full batch. It
// returns once they are delivered or dropped (with the error of the last
// failed delivery, if any), or with ctx's error when ctx is done first: never
// later than ctx's deadline, however fast events keep arriving, since events
// enqueued after the call are not its business. Events it could not send by
// then stay with the sender, which goes on sending them.
//
// Before Start, Flush delivers in the caller's goroutine, and a request under
// way is cut at ctx's deadline (its events stay queued). Flush is safe to call
// concurrently with Enqueue and with other Flush calls; after Close it does
// nothing.
func (s *Sender) Flush(ctx context.Context) error {
	select {
	case <-s.closing:
		return nil
	default:
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case <-s.startedCh:
		return s.flushLoop(ctx)
	default:
	}
	select {
	case s.token <- struct{}{}:
		defer func() { <-s.token }()
		return s.flushDirect(ctx)
	case <-s.startedCh:
		return s.flushLoop(ctx)
	case <-s.closing:
		return errClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}

// flushLoop hands a flush request to the loop and waits for it.
func (s *Sender) flushLoop(ctx context.Context) error {
	req := &flushRequest{done: make(chan struct{})}
	select {
	case s.flushReqs <- req:
	case <-ctx.Done():
		return ctx.Err()
	case <-s.done:
		return errClosed
	}
	select {
	case <-req.done:
		return req.err
	case <-ctx.Done():
		return ctx.Err()
	case <-s.done:
		select {
		case <-req.done:
			return req.err
		default:
			return errClosed
		}
	}
}

// flushDirect delivers, in the caller's goroutine and within ctx, what was
// held and queued when it started. The caller holds the token.
func (s *Sender) flushDirect(ctx context.Context) error {
	batch := s.takeHeld()
	n := len(s.queue)
	wait := func(d time.Duration) bool { return sleep(d, ctx.Done(), s.closing) }
	var err error
	for {
		batch, n = s.fill(batch, n)
		if len(batch) == 0 {
			return err
		}
		if stop := s.stopped(ctx); stop != nil {
			s.handBack(batch)
			return stop
		}
		ok, derr := s.deliver(ctx, batch, wait)
		if !ok {
			s.handBack(batch)
			if stop := s.stopped(ctx); stop != nil {
				return stop
			}
			return derr
		}
		if derr != nil {
			err = derr
		}
		batch = batch[:0]
	}
}

// stopped tells why a direct delivery must stop: ctx is done or Close began.
func (s *Sender) stopped(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case <-s.closing:
		return errClosed
	default:
		return nil
	}
}

// fill tops batch up from the queue to BatchSize, taking at most n events;
// it returns the batch and how many of the n are left.
func (s *Sender) fill(batch []Event, n int) ([]Event, int) {
	for n > 0 && len(batch) < s.batchSize() {
		select {
		case e := <-s.queue:
			batch = append(batch, e)
			n--
		default:
			return batch, 0
		}
	}
	return batch, n
}

// Close stops the loop (waiting for it, within ctx), then delivers within ctx
// what remains: the loop's batch and the queue. Whatever is still undelivered
// at ctx's deadline is counted as dropped ("shutdown"), except a request under
// way in the loop at that moment, which finishes within Timeout and is counted
// then. Close returns ctx's error when the deadline cut it short, else the
// error of the last failed delivery (nil when everything was delivered).
//
// Close is idempotent and safe from several goroutines: the calls after the
// first wait for it (within their own ctx). Enqueue after Close drops
// ("closed"); Flush after Close does nothing.
func (s *Sender) Close(ctx context.Context) error {
	s.life.Lock()
	if s.closeStarted {
		s.life.Unlock()
		select {
		case <-s.closeDone:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	s.closeStarted = true
	started := s.started
	s.life.Unlock()
	defer close(s.closeDone)

	s.gate.Lock()
	s.closed = true
	s.gate.Unlock()
	close(s.closing)

	if started {
		select {
		case <-s.done:
		case <-ctx.Done():
			return s.abandon(ctx.Err())
		}
	}
	// The loop has exited; a direct Flush may still hold the token, and lets it
	// go at its next step now that closing is closed.
	select {
	case s.token <- struct{}{}:
		defer func() { <-s.token }()
	case <-ctx.Done():
		return s.abandon(ctx.Err())
	}
	batch := s.takeHeld()
	wait := func(d time.Duration) bool { return sleep(d, ctx.Done(), nil) }
	var err error
	for {
		batch, _ = s.fill(batch, len(s.queue))
		if len(batch) == 0 {
			return s.abandon(err)
		}
		if ctx.Err() != nil {
			s.handBack(batch)
			return s.abandon(ctx.Err())
		}
		ok, derr := s.deliver(ctx, batch, wait)
		if !ok {
			s.handBack(batch)
			return s.abandon(ctx.Err())
		}
		if derr != nil {
			err = derr
		}
		batch = batch[:0]
	}
}

// abandon ends Close: what is held or queued is dropped ("shutdown"), and so is
// whatever a delivery still under way hands back later.
func (s *Sender) abandon(err error) error {
	s.mu.Lock()
	s.abandoned = true
	n := len(s.held)
	s.held = nil
	s.mu.Unlock()
	for {
		select {
		case <-s.queue:
			n++
			continue
		default:
		}
		break
	}
	if n > 0 {
		s.dropped(n, "shutdown")
	}
	return err
}

// handBack keeps events a delivery could not resolve for the next one (or
// drops them when Close has given up).
func (s *Sender) handBack(batch []Event) {
	if len(batch) == 0 {
		return
	}
	s.mu.Lock()
	abandoned := s.abandoned
	if !abandoned {
		s.held = append(s.held, batch...)
	}
	s.mu.Unlock()
	if abandoned {
		s.dropped(len(batch), "shutdown")
	}
}

func (s *Sender) takeHeld() []Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	held := s.held
	s.held = nil
	return held
}

// run is the delivery loop. It holds the token for its whole life.
func (s *Sender) run() {
	defer close(s.done)
	select {
	case s.token <- struct{}{}:
	case <-s.closing:
		return
	}
	l := &loop{s: s, interval: s.FlushInterval}
	if l.interval <= 0 {
		l.interval = DefaultFlushInterval
	}
	defer func() {
		l.disarm()
		s.handBack(l.batch)
		<-s.token
	}()
	if held := s.takeHeld(); len(held) > 0 {
		l.batch = held
		l.arm()
	}
	for {
		select {
		case <-s.closing:
			return
		default:
		}
		if len(l.waiting) > 0 {
			if !l.serveFlush() {
				return
			}
			continue
		}
		select {
		case <-s.closing:
			return
		case req := <-s.flushReqs:
			l.waiting = append(l.waiting, req)
		case e := <-s.queue:
			l.batch = append(l.batch, e)
			if len(l.batch) == 1 {
				l.arm()
			}
			if len(l.batch) >= s.batchSize() {
				if ok, _ := l.send(); !ok {
					return
				}
			}
		case <-l.due:
			l.due = nil
			if ok, _ := l.send(); !ok {
				return
			}
		}
	}
}

// loop is the delivery loop's own state.
type loop struct {
	s        *Sender
	interval time.Duration
	batch    []Event
	timer    *time.Timer
	due      <-chan time.Time // fires FlushInterval after the batch's first event
	waiting  []*flushRequest
}

func (l *loop) arm() {
	l.disarm()
	l.timer = time.NewTimer(l.interval)
	l.due = l.timer.C
}

func (l *loop) disarm() {
	if l.timer != nil {
		l.timer.Stop()
		l.timer, l.due = nil, nil
	}
}

// send delivers the batch; false means Close began or interrupted it (the
// batch is kept, for Close). The request itself is bounded by Timeout only:
// stopping does not abort a delivery PostHog may already have accepted.
func (l *loop) send() (bool, error) {
	select {
	case <-l.s.closing:
		return false, nil
	default:
	}
	ok, err := l.s.deliver(context.Background(), l.batch, l.wait)
	if !ok {
		return false, err
	}
	l.batch = l.batch[:0]
	l.disarm()
	return true, err
}

// wait is the loop's retry back-off: cut short by a flush request (taken, to
// be served after this delivery) or by Close (false).
func (l *loop) wait(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case req := <-l.s.flushReqs:
		l.waiting = append(l.waiting, req)
		return true
	case <-l.s.closing:
		return false
	}
}

// serveFlush answers the waiting flush requests: it sends the partial batch
// and the events queued now, in batches, then signals the requests. False
// means Close interrupted it.
func (l *loop) serveFlush() bool {
	reqs := l.waiting
	l.waiting = nil
	n := len(l.s.queue)
	var err error
	for {
		l.batch, n = l.s.fill(l.batch, n)
		if len(l.batch) == 0 {
			break
		}
		ok, derr := l.send()
		if !ok {
			return false
		}
		if derr != nil {
			err = derr
		}
	}
	for _, req := range reqs {
		req.err = err
		close(req.done)
	}
	return true
}

// sleep waits d; false when one of the stop channels (nil ones never fire)
// is closed first.
func sleep(d time.Duration, stop1, stop2 <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-stop1:
		return false
	case <-stop2:
		return false
	}
}

func (s *Sender) batchSize() int {
	if s.BatchSize > 0 {
		return s.BatchSize
	}
	return DefaultBatchSize
}

// deliver posts one batch, retrying transient failures (5xx, 429, network
// errors) after back-off waits; other 4xx answers drop it ("refused"), and so
// do exhausted retries ("retries_exhausted"). ctx bounds the requests (each
// one is also bounded by Timeout); wait does the back-off and reports false
// when the delivery must stop. When ctx ends or wait says stop, deliver
// reports false: the batch is neither delivered nor dropped, and is the
// caller's to keep.
func (s *Sender) deliver(ctx context.Context, batch []Event, wait func(time.Duration) bool) (bool, error) {
	body, err := s.encode(batch)
	if err != nil {
		s.dropped(len(batch), "encoding")
		return true, err
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
		err = s.post(ctx, body)
		if err == nil {
			s.sent(len(batch))
			return true, nil
		}
		var se *StatusError
		if errors.As(err, &se) && se.StatusCode >= 400 && se.StatusCode < 500 && se.StatusCode != http.StatusTooManyRequests {
			s.dropped(len(batch), "refused")
			return true, err
		}
		if ctx.Err() != nil {
			return false, err
		}
		if attempt >= retries {
			s.dropped(len(batch), "retries_exhausted")
			return true, err
		}
		if !wait(backoff) {
			return false, err
		}
		backoff *= 2
	}
}

// sent and dropped report accepted events; the callbacks are told before
// Pending goes down, so that Pending() == 0 means they have been told.
func (s *Sender) sent(n int) {
	if s.Sent != nil {
		s.Sent(n)
	}
	s.pending.Add(-int64(n))
}

func (s *Sender) dropped(n int, reason string) {
	s.drop(n, reason)
	s.pending.Add(-int64(n))
}

// drop reports events given up, accepted or not.
func (s *Sender) drop(n int, reason string) {
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

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
	DefaultBatchSize     = 500
	DefaultFlushInterval = time.Second
	DefaultMaxRetries    = 3
	// DefaultMaxInFlight is how many batches may be in delivery at once. With
	// batches of 500 it carries 20,000 events/s to a /batch/ that takes 100 ms
	// to answer, more than a proxy on a small machine serves new users.
	DefaultMaxInFlight = 4
)

// abortGrace is how long Close waits, past its deadline, for the deliveries it
// cancelled to unwind (cancelling a request under way takes Go's transport
// microseconds; a custom HTTPClient that ignores cancellation is not waited
// for longer than this).
const abortGrace = 100 * time.Millisecond

// Sender delivers events to PostHog's /batch/ endpoint: a bounded queue that
// never blocks the caller, batches, gzip, retries with back-off, up to
// MaxInFlight batches in delivery at once. What it cannot deliver it counts as
// dropped: every accepted event is reported exactly once, to Sent or to
// Dropped, by the one function that delivers a batch (deliver).
//
// One loop, owned by the sender, takes events out of the queue, forms the
// batches and hands each to a delivery of its own once one of the MaxInFlight
// slots is free; Flush asks it to send what is waiting and waits for those
// deliveries, and Close stops it. A sender can so outlive the configurations
// that use it: it is started once and closed when the last one is done with
// it. Order between batches is not kept ($feature_flag_called events carry
// their own timestamps).
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
	// MaxInFlight bounds the batches in delivery at once (retry back-offs
	// included). Default: DefaultMaxInFlight.
	MaxInFlight int
	// MaxRetries is how many times a failed batch is retried (with back-off
	// from RetryBackoff, doubling) before its events are dropped.
	MaxRetries   int
	RetryBackoff time.Duration
	// UserAgent identifies the sender.
	UserAgent string
	// Sent and Dropped are told how many events were delivered or given up
	// (queue_full, closed, refused by PostHog, retries_exhausted, encoding,
	// shutdown).
	Sent    func(n int)
	Dropped func(n int, reason string)

	queue   chan Event
	pending atomic.Int64 // accepted, not yet reported to Sent or Dropped

	// gate orders Enqueue against Close: once closed is set, nothing more
	// enters the queue, so that Close's final delivery covers everything.
	gate   sync.RWMutex
	closed bool

	life         sync.Mutex // guards started and closeStarted
	started      bool
	closeStarted bool
	closing      chan struct{} // closed when Close begins
	closeDone    chan struct{} // closed when Close returns
	done         chan struct{} // closed when the loop and every delivery have ended
	flushReqs    chan *flushRequest
	// stopCtx is the context of every request; abort cancels it at Close's
	// deadline, and what is under way then is dropped ("shutdown").
	stopCtx context.Context
	abort   context.CancelFunc
	// closeErr is Close's result when the final delivery completed; written
	// by the loop before done is closed.
	closeErr error

	// mu guards the deliveries under way and the flush requests' counts.
	mu       sync.Mutex
	inFlight map[*batch]struct{}
}

// batch is one delivery: its events and the flush requests waiting for it.
type batch struct {
	events []Event
	// waiters are the flush requests this batch holds up (guarded by mu).
	waiters []*flushRequest
	// hurry is closed when a flush waits for the batch: a retry's back-off
	// is cut short (hurried guarded by mu).
	hurry   chan struct{}
	hurried bool
}

// flushRequest is a Flush (or Close's final delivery) waiting on the loop.
// Its fields other than done are guarded by the sender's mu.
type flushRequest struct {
	// until is the loop's count of events taken from the queue once the
	// request's events are all taken.
	until int64
	// left counts the batches holding the request's events not yet resolved;
	// formed is set once the last of them has been formed.
	left   int
	formed bool
	err    error
	done   chan struct{}
}

func newFlushRequest() *flushRequest { return &flushRequest{done: make(chan struct{})} }

var errClosed = errors.New("posthog events: sender closed")

// NewSender returns a sender with a queue of queueSize events (0: the default).
// Its configuration fields must be set before Start.
func NewSender(host, projectKey string, queueSize int) *Sender {
	if queueSize <= 0 {
		queueSize = DefaultQueueSize
	}
	ctx, abort := context.WithCancel(context.Background())
	return &Sender{
		Host: host, ProjectAPIKey: projectKey,
		queue:     make(chan Event, queueSize),
		closing:   make(chan struct{}),
		closeDone: make(chan struct{}),
		done:      make(chan struct{}),
		flushReqs: make(chan *flushRequest),
		stopCtx:   ctx,
		abort:     abort,
		inFlight:  map[*batch]struct{}{},
	}
}

// Start starts the sender's loop, which sends a batch when it is full or
// FlushInterval after its first event. Start is idempotent, and does nothing
// after Close. Before Start, Enqueue queues; Flush and Close start the loop
// themselves.
func (s *Sender) Start() {
	s.life.Lock()
	defer s.life.Unlock()
	if !s.closeStarted {
		s.launch()
	}
}

// launch starts the loop once; the caller holds life.
func (s *Sender) launch() {
	if !s.started {
		s.started = true
		go s.run()
	}
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
// batch and the batches under way included (their retry back-offs are cut
// short), without waiting for FlushInterval or a full batch. It returns once
// they are delivered or dropped (with the error of the last failed delivery,
// if any), or with ctx's error when ctx is done first: never later than ctx's
// deadline, however fast events keep arriving, since events enqueued after the
// call are not its business. Events it could not send by then stay with the
// sender, which goes on sending them.
//
// Flush is safe to call concurrently with Enqueue and with other Flush calls;
// before Start it starts the loop; after Close it does nothing.
func (s *Sender) Flush(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	req, err := s.requestFlush(ctx)
	if req == nil {
		return err
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

// FlushAsync asks the loop to send its partial batch and what is queued now,
// as Flush does, without waiting for the deliveries. It does nothing after
// Close.
func (s *Sender) FlushAsync() { s.requestFlush(context.Background()) }

// requestFlush hands a flush request to the loop; nil when it was not taken
// (Close began, or ctx ended first: the error says which).
func (s *Sender) requestFlush(ctx context.Context) (*flushRequest, error) {
	s.life.Lock()
	if s.closeStarted {
		s.life.Unlock()
		return nil, nil
	}
	s.launch()
	s.life.Unlock()
	req := newFlushRequest()
	select {
	case s.flushReqs <- req:
		return req, nil
	case <-s.closing:
		return nil, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Close stops taking events and delivers, within ctx, everything the sender
// holds: the queue, the loop's batch and the batches under way (their retry
// back-offs cut short). At ctx's deadline the requests still under way are
// cancelled, and every event not delivered by then is counted as dropped
// ("shutdown"; one whose request was cut may have reached PostHog all the
// same). Close returns by ctx's deadline (plus the moment cancelled requests
// take to unwind, at most abortGrace), with ctx's error when the deadline cut
// it short, else the error of the last failed delivery (nil when everything
// was delivered). The loop and its deliveries have ended when it returns.
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
	s.launch()
	s.life.Unlock()
	defer close(s.closeDone)
	defer s.abort()

	s.gate.Lock()
	s.closed = true
	s.gate.Unlock()
	close(s.closing)

	select {
	case <-s.done:
		return s.closeErr
	case <-ctx.Done():
	}
	s.abort()
	grace := time.NewTimer(abortGrace)
	defer grace.Stop()
	select {
	case <-s.done:
	case <-grace.C:
	}
	return ctx.Err()
}

// run is the loop: the only reader of the queue, and the only one forming
// batches and starting deliveries.
func (s *Sender) run() {
	l := &loop{s: s, interval: s.FlushInterval, slots: make(chan struct{}, s.maxInFlight())}
	if l.interval <= 0 {
		l.interval = DefaultFlushInterval
	}
	defer close(s.done)
	defer l.deliveries.Wait()
	defer l.disarm()
	var final *flushRequest
	var finalDone <-chan struct{}
	closing := s.closing
	for {
		bs := s.batchSize()
		var take <-chan Event
		if len(l.batch) < bs {
			take = s.queue
		}
		var slot chan<- struct{}
		if len(l.batch) >= bs || (len(l.batch) > 0 && (l.overdue || (len(l.waiters) > 0 && l.taken >= l.until()))) {
			slot = l.slots
		}
		select {
		case <-closing:
			// Close's final delivery is a flush of everything: the gate is
			// shut, so the queue holds all there will ever be.
			closing = nil
			final = newFlushRequest()
			finalDone = final.done
			l.addFlush(final)
		case <-finalDone:
			s.closeErr = final.err
			return
		case <-s.stopCtx.Done():
			l.abandon()
			return
		case req := <-s.flushReqs:
			l.addFlush(req)
		case e := <-take:
			l.batch = append(l.batch, e)
			l.taken++
			if len(l.batch) == 1 {
				l.arm()
			}
		case <-l.due:
			l.due, l.overdue = nil, true
		case slot <- struct{}{}:
			l.dispatch()
		}
	}
}

// loop is the loop's own state.
type loop struct {
	s        *Sender
	interval time.Duration
	slots    chan struct{} // one per delivery under way
	// deliveries are the delivery goroutines, waited for when the loop ends.
	deliveries sync.WaitGroup
	batch      []Event
	taken      int64 // events taken from the queue so far
	timer      *time.Timer
	due        <-chan time.Time // fires FlushInterval after the batch's first event
	overdue    bool             // the batch is due: send it as soon as a slot is free
	// waiters are the flush requests some of whose events are in the batch
	// or still queued.
	waiters []*flushRequest
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

// until is how many events the loop must have taken to have formed the
// batches of every waiting flush.
func (l *loop) until() int64 {
	var u int64
	for _, r := range l.waiters {
		u = max(u, r.until)
	}
	return u
}

// addFlush registers a flush request: it waits for every delivery under way,
// the loop's batch and the events queued now.
func (l *loop) addFlush(req *flushRequest) {
	s := l.s
	req.until = l.taken + int64(len(s.queue))
	s.mu.Lock()
	defer s.mu.Unlock()
	for b := range s.inFlight {
		b.waiters = append(b.waiters, req)
		req.left++
		if !b.hurried {
			b.hurried = true
			close(b.hurry)
		}
	}
	if len(l.batch) == 0 && req.until <= l.taken {
		req.formed = true
		if req.left == 0 {
			close(req.done)
		}
		return
	}
	l.waiters = append(l.waiters, req)
}

// dispatch hands the loop's batch to a delivery of its own; the caller has
// taken a slot for it.
func (l *loop) dispatch() {
	s := l.s
	b := &batch{events: l.batch, hurry: make(chan struct{})}
	l.batch = make([]Event, 0, min(s.batchSize(), cap(s.queue)))
	l.disarm()
	l.overdue = false
	s.mu.Lock()
	s.inFlight[b] = struct{}{}
	keep := l.waiters[:0]
	for _, r := range l.waiters {
		b.waiters = append(b.waiters, r)
		r.left++
		if r.until <= l.taken {
			r.formed = true
		} else {
			keep = append(keep, r)
		}
	}
	clear(l.waiters[len(keep):])
	l.waiters = keep
	if len(b.waiters) > 0 {
		b.hurried = true
		close(b.hurry)
	}
	s.mu.Unlock()
	l.deliveries.Add(1)
	go func() {
		defer l.deliveries.Done()
		defer func() { <-l.slots }()
		s.resolve(b, s.deliver(b))
	}()
}

// abandon ends the loop at Close's deadline: the batch and the queue are
// dropped ("shutdown"); the deliveries under way, whose requests are being
// cancelled, drop theirs.
func (l *loop) abandon() {
	n := len(l.batch)
	l.batch = nil
	for {
		select {
		case <-l.s.queue:
			n++
			continue
		default:
		}
		break
	}
	if n > 0 {
		l.s.dropped(n, "shutdown")
	}
}

// resolve ends a delivery: the flush requests waiting for it are told, and
// those it was the last one for are done.
func (s *Sender) resolve(b *batch, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.inFlight, b)
	for _, r := range b.waiters {
		r.left--
		if err != nil {
			r.err = err
		}
		if r.formed && r.left == 0 {
			close(r.done)
		}
	}
}

func (s *Sender) batchSize() int {
	if s.BatchSize > 0 {
		return s.BatchSize
	}
	return DefaultBatchSize
}

func (s *Sender) maxInFlight() int {
	if s.MaxInFlight > 0 {
		return s.MaxInFlight
	}
	return DefaultMaxInFlight
}

// deliver posts one batch, and is the one place that decides what becomes of
// its events: delivered (Sent), or dropped when PostHog refuses them (a 4xx
// other than 429: "refused"), when transient failures (5xx, 429, network
// errors) outlast the retries ("retries_exhausted"), or when Close's deadline
// cancels the delivery ("shutdown"). Retries wait a doubling back-off, cut
// short once a flush waits for the batch. It returns the last error.
func (s *Sender) deliver(b *batch) error {
	ctx, n := s.stopCtx, len(b.events)
	body, err := s.encode(b.events)
	if err != nil {
		s.dropped(n, "encoding")
		return err
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
			s.sent(n)
			return nil
		}
		var se *StatusError
		switch {
		case errors.As(err, &se) && se.StatusCode >= 400 && se.StatusCode < 500 && se.StatusCode != http.StatusTooManyRequests:
			s.dropped(n, "refused")
			return err
		case ctx.Err() != nil:
			s.dropped(n, "shutdown")
			return err
		case attempt >= retries:
			s.dropped(n, "retries_exhausted")
			return err
		}
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-b.hurry:
			t.Stop()
		case <-ctx.Done():
			t.Stop()
			s.dropped(n, "shutdown")
			return err
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
	// The fastest level: batches of similar JSON events compress well at any
	// level, and the sender's CPU is the proxy's.
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
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

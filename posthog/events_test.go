package posthog

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flagsplit/flagsplit/posthog/posthogtest"
)

type eventCounts struct {
	sent, dropped atomic.Int64
	reasons       chan string

	mu       sync.Mutex
	byReason map[string]int
}

// reason returns how many events were dropped for reason.
func (c *eventCounts) reason(r string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.byReason[r]
}

// droppedAccepted returns the drops of accepted events (the queue_full and
// closed ones were refused by Enqueue).
func (c *eventCounts) droppedAccepted() int64 {
	return c.dropped.Load() - int64(c.reason("queue_full")+c.reason("closed"))
}

func newTestSender(srv *posthogtest.Server, queue int) (*Sender, *eventCounts) {
	return newTestSenderTo(srv.URL, queue)
}

func newTestSenderTo(url string, queue int) (*Sender, *eventCounts) {
	counts := &eventCounts{reasons: make(chan string, 100), byReason: map[string]int{}}
	s := NewSender(url, projectKey, queue)
	// A generous Timeout: on a loaded machine a request that times out after
	// the server recorded it is retried, and its events arrive twice.
	s.BatchSize, s.FlushInterval, s.RetryBackoff, s.Timeout = 10, 20*time.Millisecond, 10*time.Millisecond, 10*time.Second
	s.Sent = func(n int) { counts.sent.Add(int64(n)) }
	s.Dropped = func(n int, reason string) {
		counts.mu.Lock()
		counts.byReason[reason] += n
		counts.mu.Unlock()
		counts.dropped.Add(int64(n))
		select {
		case counts.reasons <- reason:
		default:
		}
	}
	return s, counts
}

func flagEvent(i int) Event {
	return Event{Event: "$feature_flag_called", DistinctID: "user-" + strconv.Itoa(i), Timestamp: time.Now().UTC(),
		Properties: map[string]any{"$feature_flag": "checkout", "$feature_flag_response": true, "locally_evaluated": true}}
}

// unreachable returns the address of a server that is no longer listening.
func unreachable() string {
	srv := httptest.NewServer(http.NotFoundHandler())
	srv.Close()
	return srv.URL
}

func timeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

// closeSender closes s within 10 s and checks that its loop (if started) exits.
func closeSender(t *testing.T, s *Sender) error {
	t.Helper()
	ctx, cancel := timeout(10 * time.Second)
	defer cancel()
	err := s.Close(ctx)
	if s.started {
		waitLoopExit(t, s)
	}
	return err
}

func waitLoopExit(t *testing.T, s *Sender) {
	t.Helper()
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
		t.Fatal("the delivery loop did not exit after Close")
	}
}

// distinctIDs checks that the server got each event once and returns them.
func distinctIDs(t *testing.T, srv *posthogtest.Server) map[string]bool {
	t.Helper()
	events, _ := srv.Events()
	ids := make(map[string]bool, len(events))
	for _, e := range events {
		if ids[e.DistinctID] {
			t.Errorf("event %s delivered twice", e.DistinctID)
		}
		ids[e.DistinctID] = true
	}
	return ids
}

func TestSenderBatchesAndDelivers(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	s, counts := newTestSender(srv, 100)
	s.UserAgent = "flagsplit-test"
	s.Start()
	s.Start() // idempotent
	for i := 0; i < 25; i++ {
		if !s.Enqueue(flagEvent(i)) {
			t.Fatal("enqueue failed with room in the queue")
		}
	}
	eventually(t, "delivery", func() bool { return counts.sent.Load() == 25 })
	events, batches := srv.Events()
	if len(events) != 25 || batches < 3 {
		t.Errorf("server got %d events in %d batches (batch size 10)", len(events), batches)
	}
	// Batches travel side by side, so their order is not kept.
	ids := distinctIDs(t, srv)
	for i := 0; i < 25; i++ {
		if !ids["user-"+strconv.Itoa(i)] {
			t.Errorf("event %d missing", i)
		}
	}
	if e := events[0]; e.Event != "$feature_flag_called" || e.Properties["$feature_flag"] != "checkout" || e.Timestamp == "" || e.APIKey != projectKey {
		t.Errorf("event %+v", e)
	}
	if err := closeSender(t, s); err != nil || s.Pending() != 0 || counts.dropped.Load() != 0 {
		t.Errorf("close: %v, pending %d, dropped %d", err, s.Pending(), counts.dropped.Load())
	}
}

func TestSenderEncodesGzipJSON(t *testing.T) {
	s := NewSender("", projectKey, 0)
	body, err := s.encode([]Event{flagEvent(1), flagEvent(2)})
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("the body is not gzip: %v", err)
	}
	var payload struct {
		APIKey string           `json:"api_key"`
		Batch  []map[string]any `json:"batch"`
		SentAt time.Time        `json:"sent_at"`
	}
	if err := json.NewDecoder(zr).Decode(&payload); err != nil {
		t.Fatal(err)
	}
	if payload.APIKey != projectKey || len(payload.Batch) != 2 || payload.Batch[1]["distinct_id"] != "user-2" ||
		payload.SentAt.IsZero() || time.Since(payload.SentAt) > time.Minute {
		t.Errorf("payload %+v", payload)
	}
}

func TestSenderNeverBlocksAndCountsDrops(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	s, counts := newTestSender(srv, 5)
	start := time.Now()
	for i := 0; i < 8; i++ {
		s.Enqueue(flagEvent(i)) // nothing is draining the queue
	}
	if time.Since(start) > 100*time.Millisecond || counts.dropped.Load() != 3 || <-counts.reasons != "queue_full" || s.Pending() != 5 {
		t.Errorf("full queue: took %v, dropped %d, pending %d", time.Since(start), counts.dropped.Load(), s.Pending())
	}
	// Before Start, Flush starts the loop and waits for its deliveries.
	if err := s.Flush(context.Background()); err != nil || counts.sent.Load() != 5 || s.Pending() != 0 {
		t.Errorf("flush: %v, sent %d, pending %d", err, counts.sent.Load(), s.Pending())
	}
}

func TestSenderRetriesThenDrops(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	s, counts := newTestSender(srv, 100)
	s.MaxRetries = 2

	srv.FailNextBatches(2, http.StatusServiceUnavailable)
	s.Enqueue(flagEvent(1))
	if err := s.Flush(context.Background()); err != nil || counts.sent.Load() != 1 || srv.BatchAttempts() != 3 {
		t.Fatalf("transient 503s were not retried: %v, sent %d, attempts %d", err, counts.sent.Load(), srv.BatchAttempts())
	}
	srv.FailNextBatches(1, http.StatusTooManyRequests)
	s.Enqueue(flagEvent(2))
	if err := s.Flush(context.Background()); err != nil || counts.sent.Load() != 2 {
		t.Fatalf("a 429 was not retried: %v, sent %d", err, counts.sent.Load())
	}

	srv.FailBatchesWith(http.StatusBadRequest)
	s.Enqueue(flagEvent(3))
	if err := s.Flush(context.Background()); err == nil || counts.dropped.Load() != 1 || <-counts.reasons != "refused" {
		t.Errorf("a 400 must drop the batch at once: %v, dropped %d", err, counts.dropped.Load())
	}
	srv.FailBatchesWith(http.StatusInternalServerError)
	before := srv.BatchAttempts()
	s.Enqueue(flagEvent(4))
	var se *StatusError
	if err := s.Flush(context.Background()); !errors.As(err, &se) || se.StatusCode != 500 || counts.dropped.Load() != 2 ||
		<-counts.reasons != "retries_exhausted" || srv.BatchAttempts()-before != 3 {
		t.Errorf("retries exhausted: %v, dropped %d, attempts %d", err, counts.dropped.Load(), srv.BatchAttempts()-before)
	}
	if events, _ := srv.Events(); len(events) != 2 || s.Pending() != 0 {
		t.Errorf("server got %d events, %d pending", len(events), s.Pending())
	}
}

func TestSenderRequestBoundedByTimeout(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	release := srv.BlockBatches()
	defer srv.Close()
	defer release()
	s, counts := newTestSender(srv, 100)
	s.Timeout, s.MaxRetries = 50*time.Millisecond, 1
	s.Start()
	s.Enqueue(flagEvent(1))
	eventually(t, "the request to time out, be retried and dropped", func() bool { return counts.dropped.Load() == 1 })
	if srv.BatchAttempts() != 2 || counts.reason("retries_exhausted") != 1 || s.Pending() != 0 {
		t.Errorf("attempts %d, reasons %v, pending %d", srv.BatchAttempts(), counts.byReason, s.Pending())
	}
	release()
	closeSender(t, s)
}

// The defect behind a hanging `caddy reload`: Flush must return by its
// deadline while new events keep arriving, and it must not lose any.
func TestSenderFlushBoundedUnderSteadyTraffic(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	srv.SetBatchDelay(100 * time.Millisecond)
	s, counts := newTestSender(srv, 100000)
	s.BatchSize = 200
	s.Start()

	var enqueued, refused atomic.Int64
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if s.Enqueue(flagEvent(i)) {
				enqueued.Store(int64(i + 1))
			} else {
				refused.Add(1)
			}
			time.Sleep(time.Millisecond) // pacing: ~1000 events/s, steady
		}
	}()
	eventually(t, "steady traffic", func() bool { return srv.BatchAttempts() >= 3 })

	before := int(enqueued.Load())
	ctx, cancel := timeout(time.Second)
	start := time.Now()
	err := s.Flush(ctx)
	took := time.Since(start)
	cancel()
	if took > 1500*time.Millisecond {
		t.Errorf("Flush took %v under steady traffic; its deadline was 1s", took)
	}
	check := func(when string) {
		ids := distinctIDs(t, srv)
		for i := 0; i < before; i++ {
			if !ids["user-"+strconv.Itoa(i)] {
				t.Fatalf("%s: event %d, enqueued before Flush, was not delivered", when, i)
			}
		}
	}
	switch {
	case err == nil:
		check("when Flush returned")
	case errors.Is(err, context.DeadlineExceeded):
		t.Logf("Flush hit its deadline after %v; its events must still be delivered", took)
	default:
		t.Fatalf("Flush: %v", err)
	}

	// With a deadline that is long enough for the backlog, Flush succeeds
	// however fast new events arrive.
	before = int(enqueued.Load())
	ctx, cancel = timeout(5 * time.Second)
	err = s.Flush(ctx)
	cancel()
	if err != nil {
		t.Fatalf("Flush with 5s for a backlog of one batch, under steady traffic: %v", err)
	}
	check("when the second Flush returned")

	close(stop)
	<-stopped
	if err := closeSender(t, s); err != nil {
		t.Errorf("close: %v", err)
	}
	check("after Close")
	accepted := enqueued.Load()
	if refused.Load() != 0 || counts.sent.Load()+counts.dropped.Load() != accepted || counts.dropped.Load() != 0 || s.Pending() != 0 {
		t.Errorf("accepted %d (refused %d): sent %d, dropped %d, pending %d",
			accepted, refused.Load(), counts.sent.Load(), counts.dropped.Load(), s.Pending())
	}
	if ids := distinctIDs(t, srv); int64(len(ids)) != accepted {
		t.Errorf("server got %d distinct events, %d were accepted", len(ids), accepted)
	}
}

// The defect behind a reload that does not flush: the loop's partial batch
// goes out at once, not after FlushInterval.
func TestSenderFlushSendsTheLoopsPartialBatch(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	s, counts := newTestSender(srv, 100)
	s.BatchSize, s.FlushInterval = 1000, time.Hour
	s.Start()
	for i := 0; i < 20; i++ {
		s.Enqueue(flagEvent(i))
	}
	eventually(t, "the loop to take the events into its batch", func() bool { return s.Pending() == 20 && s.queued() == 0 })
	ctx, cancel := timeout(5 * time.Second)
	defer cancel()
	start := time.Now()
	if err := s.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
	events, batches := srv.Events()
	if took := time.Since(start); took > 2*time.Second || len(events) != 20 || batches != 1 || counts.sent.Load() != 20 || s.Pending() != 0 {
		t.Errorf("flush took %v: server got %d events in %d batches; sent %d, pending %d",
			took, len(events), batches, counts.sent.Load(), s.Pending())
	}
	closeSender(t, s)
}

// hungDelivery starts a sender with batches of 5 and n events (n <= 20), and
// returns once all its batches are in deliveries PostHog holds unanswered
// until release; then it calls stop with a 200 ms deadline and checks that
// stop returns the deadline error by then.
func hungDelivery(t *testing.T, n int, stop func(*Sender, context.Context) error) (srv *posthogtest.Server, s *Sender, counts *eventCounts, release func()) {
	t.Helper()
	srv = posthogtest.New(projectKey, personalKey, []byte(defsV1))
	release = srv.BlockBatches()
	t.Cleanup(srv.Close)
	t.Cleanup(release)
	s, counts = newTestSender(srv, 100)
	s.BatchSize = 5
	s.Start()
	for i := 0; i < n; i++ {
		s.Enqueue(flagEvent(i))
	}
	batches := int64((n + 4) / 5)
	eventually(t, "every batch in flight", func() bool { return srv.BatchesInFlight() == batches })
	ctx, cancel := timeout(200 * time.Millisecond)
	defer cancel()
	start := time.Now()
	err := stop(s, ctx)
	if took := time.Since(start); !errors.Is(err, context.DeadlineExceeded) || took > time.Second {
		t.Fatalf("with a hung delivery: %v after %v; want the deadline error at 200ms", err, took)
	}
	return srv, s, counts, release
}

func TestSenderFlushWhileDeliveryHangs(t *testing.T) {
	srv, s, counts, release := hungDelivery(t, 8, (*Sender).Flush)
	if s.Pending() != 8 || counts.dropped.Load() != 0 {
		t.Fatalf("after the flush gave up: %d pending, %d dropped", s.Pending(), counts.dropped.Load())
	}

	release()
	ctx, cancel := timeout(5 * time.Second)
	defer cancel()
	if err := s.Flush(ctx); err != nil || counts.sent.Load() != 8 || counts.dropped.Load() != 0 || s.Pending() != 0 {
		t.Errorf("after the release: %v, sent %d, dropped %d, pending %d", err, counts.sent.Load(), counts.dropped.Load(), s.Pending())
	}
	if ids := distinctIDs(t, srv); len(ids) != 8 {
		t.Errorf("server got %d distinct events", len(ids))
	}
	closeSender(t, s)
}

func TestSenderFlushCutsRetryBackoffShort(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	s, counts := newTestSender(srv, 100)
	s.BatchSize, s.RetryBackoff = 1, time.Hour
	srv.FailNextBatches(1, http.StatusServiceUnavailable)
	s.Start()
	s.Enqueue(flagEvent(1))
	eventually(t, "a failed attempt", func() bool { return srv.BatchAttempts() == 1 })
	ctx, cancel := timeout(5 * time.Second)
	defer cancel()
	if err := s.Flush(ctx); err != nil || counts.sent.Load() != 1 || srv.BatchAttempts() != 2 {
		t.Errorf("flush during an hour-long back-off: %v, sent %d, attempts %d", err, counts.sent.Load(), srv.BatchAttempts())
	}
	closeSender(t, s)
}

func TestSenderCloseDeliversTheRetryingBatch(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	s, counts := newTestSender(srv, 100)
	s.RetryBackoff = time.Hour // the loop is waiting to retry when it is closed
	srv.FailBatchesWith(http.StatusServiceUnavailable)
	s.Start()
	for i := 0; i < 4; i++ {
		s.Enqueue(flagEvent(i))
	}
	eventually(t, "a failed attempt", func() bool { return srv.BatchAttempts() > 0 })
	srv.FailBatchesWith(0)
	if err := closeSender(t, s); err != nil || counts.sent.Load() != 4 || counts.dropped.Load() != 0 || s.Pending() != 0 {
		t.Errorf("close mid-retry: %v, sent %d, dropped %d, pending %d", err, counts.sent.Load(), counts.dropped.Load(), s.Pending())
	}
}

// Close hurries a retrying delivery: against an unreachable PostHog the
// retries are spent at once and the events dropped, before the deadline.
func TestSenderCloseDropsWhatPostHogCannotTake(t *testing.T) {
	for _, started := range []bool{true, false} {
		t.Run("started="+strconv.FormatBool(started), func(t *testing.T) {
			s, counts := newTestSenderTo(unreachable(), 100)
			s.RetryBackoff = time.Hour
			if started {
				s.Start()
			}
			for i := 0; i < 4; i++ {
				s.Enqueue(flagEvent(i))
			}
			ctx, cancel := timeout(5 * time.Second)
			defer cancel()
			err := s.Close(ctx)
			if err == nil || errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("close with PostHog unreachable: %v; want the delivery's error", err)
			}
			waitLoopExit(t, s)
			if counts.sent.Load() != 0 || counts.dropped.Load() != 4 || counts.reason("retries_exhausted") != 4 || s.Pending() != 0 {
				t.Errorf("sent %d, dropped %v, pending %d", counts.sent.Load(), counts.byReason, s.Pending())
			}
		})
	}
}

// The defect behind a shutdown that outlived its deadline: at Close's deadline
// the requests under way are cancelled, not left to run out their Timeout, and
// every event they carried is counted as dropped by the time Close returns.
func TestSenderCloseBlockedPastItsDeadline(t *testing.T) {
	srv, s, counts, _ := hungDelivery(t, 12, (*Sender).Close)
	if counts.reason("shutdown") != 12 || counts.dropped.Load() != 12 || counts.sent.Load() != 0 || s.Pending() != 0 {
		t.Fatalf("when Close returned: dropped %v, sent %d, pending %d", counts.byReason, counts.sent.Load(), s.Pending())
	}
	// The loop and its deliveries have ended, and the stand-in saw each of
	// the three requests given up by the client.
	waitLoopExit(t, s)
	eventually(t, "the stand-in to see the requests cancelled", func() bool { return srv.BatchesAbandoned() == 3 })
	if _, batches := srv.Events(); batches != 0 {
		t.Errorf("%d batches answered", batches)
	}
}

func TestSenderCloseIsIdempotentAndFinal(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	s, counts := newTestSender(srv, 100)
	s.Start()
	for i := 0; i < 3; i++ {
		s.Enqueue(flagEvent(i))
	}
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := timeout(5 * time.Second)
			defer cancel()
			errs <- s.Close(ctx)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("close: %v", err)
		}
	}
	waitLoopExit(t, s)
	if counts.sent.Load() != 3 || s.Pending() != 0 {
		t.Errorf("sent %d, pending %d", counts.sent.Load(), s.Pending())
	}
	if err := s.Close(context.Background()); err != nil {
		t.Errorf("a second close: %v", err)
	}
	s.Start() // does nothing after Close
	if s.Enqueue(flagEvent(9)) || counts.reason("closed") != 1 || s.Pending() != 0 {
		t.Errorf("enqueue after close: dropped %v, pending %d", counts.byReason, s.Pending())
	}
	if err := s.Flush(context.Background()); err != nil {
		t.Errorf("flush after close: %v", err)
	}
	if _, batches := srv.Events(); batches != 1 {
		t.Errorf("%d batches; nothing should be sent after Close", batches)
	}
}

// Several batches are delivered at once, never more than MaxInFlight: with
// PostHog holding every request, exactly MaxInFlight are under way while the
// loop holds the next full batch and the rest stays queued.
func TestSenderBatchesInFlightBounded(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	release := srv.BlockBatches()
	defer srv.Close()
	defer release()
	s, counts := newTestSender(srv, 100)
	s.BatchSize, s.MaxInFlight = 5, 3
	s.Start()
	for i := 0; i < 50; i++ {
		s.Enqueue(flagEvent(i))
	}
	eventually(t, "three batches in flight", func() bool { return srv.BatchesInFlight() == 3 })
	// The loop has formed a fourth batch and waits for a slot: 15 events in
	// flight, 5 in its batch, 30 still queued.
	eventually(t, "the loop to wait for a slot", func() bool { return s.queued() == 30 })
	if n := srv.MaxBatchesInFlight(); n != 3 || s.Pending() != 50 {
		t.Fatalf("%d deliveries ran at once (bound 3), %d pending", n, s.Pending())
	}
	release()
	ctx, cancel := timeout(10 * time.Second)
	defer cancel()
	if err := s.Flush(ctx); err != nil || counts.sent.Load() != 50 || s.Pending() != 0 {
		t.Errorf("after the release: %v, sent %d, pending %d", err, counts.sent.Load(), s.Pending())
	}
	if n := srv.MaxBatchesInFlight(); n != 3 {
		t.Errorf("%d deliveries ran at once (bound 3)", n)
	}
	if ids := distinctIDs(t, srv); len(ids) != 50 {
		t.Errorf("server got %d distinct events", len(ids))
	}
	closeSender(t, s)
}

// The defect behind exposure events lost under load: a steady 10,000 events/s
// against a /batch/ that takes 100 ms to answer, with a queue that holds only
// a fifth of a second of them, loses nothing with the default batch size and
// deliveries in flight (one batch of 100 at a time carries 1,000 events/s).
func TestSenderSustainsTrafficAgainstSlowPostHog(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	srv.SetBatchDelay(100 * time.Millisecond)
	s, counts := newTestSender(srv, 2000)
	s.BatchSize, s.MaxInFlight = 0, 0 // the defaults
	s.Start()
	const total, perTick = 20000, 10
	tick := time.NewTicker(time.Millisecond) // pacing: at most 10,000 events/s
	for i := 0; i < total; i += perTick {
		<-tick.C
		for j := i; j < i+perTick; j++ {
			s.Enqueue(flagEvent(j))
		}
	}
	tick.Stop()
	ctx, cancel := timeout(30 * time.Second)
	defer cancel()
	if err := s.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
	if counts.dropped.Load() != 0 || counts.sent.Load() != total || s.Pending() != 0 {
		t.Errorf("sent %d, dropped %v, pending %d", counts.sent.Load(), counts.byReason, s.Pending())
	}
	if ids := distinctIDs(t, srv); len(ids) != total {
		t.Errorf("server got %d distinct events, want %d", len(ids), total)
	}
	if n := srv.MaxBatchesInFlight(); n > DefaultMaxInFlight {
		t.Errorf("%d deliveries ran at once", n)
	}
	closeSender(t, s)
}

// Every accepted event ends as sent or dropped exactly once, whatever Enqueue,
// Flush and Close do at the same time.
func TestSenderAccountsForEveryEventOnce(t *testing.T) {
	for _, flaky := range []bool{false, true} {
		t.Run("flaky="+strconv.FormatBool(flaky), func(t *testing.T) {
			srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
			defer srv.Close()
			srv.SetBatchDelay(2 * time.Millisecond)
			s, counts := newTestSender(srv, 500)
			s.BatchSize, s.RetryBackoff, s.MaxRetries = 50, time.Millisecond, 1
			if flaky {
				srv.FailBatchesWith(http.StatusServiceUnavailable)
			}
			s.Start()

			// The workers go on until they have seen Close begin, and then
			// make one more call each.
			closing := func() bool {
				select {
				case <-s.closing:
					return true
				default:
					return false
				}
			}
			var seq, accepted atomic.Int64
			var workers sync.WaitGroup
			for p := 0; p < 3; p++ {
				workers.Add(1)
				go func() {
					defer workers.Done()
					for {
						last := closing()
						if s.Enqueue(flagEvent(int(seq.Add(1)))) {
							accepted.Add(1)
						}
						if last {
							return
						}
						runtime.Gosched()
					}
				}()
			}
			workers.Add(1)
			go func() {
				defer workers.Done()
				for {
					last := closing()
					ctx, cancel := timeout(20 * time.Millisecond)
					s.Flush(ctx)
					cancel()
					if last {
						return
					}
				}
			}()
			eventually(t, "traffic", func() bool { return srv.BatchAttempts() >= 5 })

			var closers sync.WaitGroup
			closeErrs := make(chan error, 2)
			for c := 0; c < 2; c++ {
				closers.Add(1)
				go func() {
					defer closers.Done()
					ctx, cancel := timeout(10 * time.Second)
					defer cancel()
					closeErrs <- s.Close(ctx)
				}()
			}
			closers.Wait()
			workers.Wait()
			waitLoopExit(t, s)
			close(closeErrs)
			for err := range closeErrs {
				if errors.Is(err, context.DeadlineExceeded) || (!flaky && err != nil) {
					t.Errorf("close: %v", err)
				}
			}

			sent, dropped := counts.sent.Load(), counts.droppedAccepted()
			if sent+dropped != accepted.Load() || s.Pending() != 0 || counts.reason("closed") == 0 {
				t.Errorf("accepted %d: sent %d + dropped %d (%v), pending %d", accepted.Load(), sent, dropped, counts.byReason, s.Pending())
			}
			if ids := distinctIDs(t, srv); int64(len(ids)) != sent {
				t.Errorf("server got %d distinct events, %d reported sent", len(ids), sent)
			}
			if !flaky && (dropped != 0 || sent == 0) {
				t.Errorf("healthy PostHog: sent %d, dropped %v", sent, counts.byReason)
			}
		})
	}
}

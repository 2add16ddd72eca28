package posthog

import (
	"context"
	"errors"
	"net/http"
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
}

func newTestSender(srv *posthogtest.Server, queue int) (*Sender, *eventCounts) {
	counts := &eventCounts{reasons: make(chan string, 10000)}
	s := NewSender(srv.URL, projectKey, queue)
	s.BatchSize, s.FlushInterval, s.RetryBackoff, s.Timeout = 10, 20*time.Millisecond, 10*time.Millisecond, time.Second
	s.Sent = func(n int) { counts.sent.Add(int64(n)) }
	s.Dropped = func(n int, reason string) {
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

// closeSender closes s at the end of the test and checks that every event it
// accepted ended as sent or dropped.
func closeSender(t *testing.T, s *Sender, counts *eventCounts) {
	t.Cleanup(func() {
		if err := s.Close(context.Background()); err != nil {
			t.Errorf("close: %v", err)
		}
		if s.Pending() != 0 {
			t.Errorf("%d events neither sent nor dropped after Close", s.Pending())
		}
	})
}

func TestSenderBatchesAndDelivers(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	t.Cleanup(srv.Close)
	s, counts := newTestSender(srv, 100)
	s.FlushInterval = time.Hour // only full batches go by themselves
	closeSender(t, s, counts)
	s.Start()
	for i := 0; i < 25; i++ {
		if !s.Enqueue(flagEvent(i)) {
			t.Fatal("enqueue failed with room in the queue")
		}
	}
	eventually(t, "two full batches", func() bool { return counts.sent.Load() == 20 })
	if s.Pending() != 5 {
		t.Errorf("%d pending, want the 5 of the partial batch", s.Pending())
	}
	if err := s.Flush(context.Background()); err != nil || counts.sent.Load() != 25 || s.Pending() != 0 {
		t.Fatalf("flush: %v, sent %d, pending %d", err, counts.sent.Load(), s.Pending())
	}
	events, batches := srv.Events()
	if len(events) != 25 || batches != 3 {
		t.Errorf("server got %d events in %d batches (batch size 10)", len(events), batches)
	}
	if e := events[0]; e.Event != "$feature_flag_called" || e.DistinctID != "user-0" || e.Properties["$feature_flag"] != "checkout" || e.Timestamp == "" {
		t.Errorf("event %+v", e)
	}
}

func TestSenderSendsAPartialBatchAfterTheFlushInterval(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	t.Cleanup(srv.Close)
	s, counts := newTestSender(srv, 100)
	closeSender(t, s, counts)
	s.Start()
	s.Enqueue(flagEvent(1))
	eventually(t, "the interval to send the lone event", func() bool { return counts.sent.Load() == 1 })
}

func TestSenderNeverBlocksAndCountsDrops(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	t.Cleanup(srv.Close)
	s, counts := newTestSender(srv, 5)
	closeSender(t, s, counts)
	start := time.Now()
	for i := 0; i < 8; i++ {
		s.Enqueue(flagEvent(i)) // nothing is draining the queue
	}
	if time.Since(start) > 100*time.Millisecond || counts.dropped.Load() != 3 || <-counts.reasons != "queue_full" {
		t.Errorf("full queue: took %v, dropped %d", time.Since(start), counts.dropped.Load())
	}
	// Without the loop, Flush delivers in the caller's goroutine.
	if err := s.Flush(context.Background()); err != nil || counts.sent.Load() != 5 || s.Pending() != 0 {
		t.Errorf("flush: %v, sent %d, pending %d", err, counts.sent.Load(), s.Pending())
	}
}

func TestSenderRetriesThenDrops(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	t.Cleanup(srv.Close)
	s, counts := newTestSender(srv, 100)
	s.MaxRetries = 2
	closeSender(t, s, counts)

	srv.FailNextBatches(http.StatusServiceUnavailable, 2)
	s.Enqueue(flagEvent(1))
	if err := s.Flush(context.Background()); err != nil || counts.sent.Load() != 1 || srv.BatchAttempts() != 3 {
		t.Fatalf("two 503s then a success: %v, sent %d in %d attempts", err, counts.sent.Load(), srv.BatchAttempts())
	}
	srv.FailBatchesWith(http.StatusBadRequest)
	s.Enqueue(flagEvent(2))
	if err := s.Flush(context.Background()); err != nil || counts.dropped.Load() != 1 || <-counts.reasons != "refused" {
		t.Errorf("a 400 must drop the batch at once: %v, dropped %d", err, counts.dropped.Load())
	}
	srv.FailBatchesWith(http.StatusInternalServerError)
	s.Enqueue(flagEvent(3))
	if err := s.Flush(context.Background()); err != nil || counts.dropped.Load() != 2 || <-counts.reasons != "retries_exhausted" {
		t.Errorf("retries exhausted: %v, dropped %d", err, counts.dropped.Load())
	}
	if events, _ := srv.Events(); len(events) != 1 {
		t.Errorf("server got %d events", len(events))
	}
}

// The flush that a stopping config makes sends the loop's partial batch at
// once, not after the flush interval or when the batch fills.
func TestFlushSendsThePartialBatchAtOnce(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	t.Cleanup(srv.Close)
	s, counts := newTestSender(srv, 2000)
	s.BatchSize, s.FlushInterval = 1000, time.Hour
	closeSender(t, s, counts)
	s.Start()
	for i := 0; i < 20; i++ {
		s.Enqueue(flagEvent(i))
	}
	eventually(t, "the loop to hold the events", func() bool { return len(s.queue) == 0 && s.Pending() == 20 })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if events, batches := srv.Events(); len(events) != 20 || batches != 1 || s.Pending() != 0 {
		t.Errorf("after the flush: %d events in %d batches, %d pending", len(events), batches, s.Pending())
	}
}

// Flush returns by its deadline however fast events keep coming: it sends
// what was queued when it was called, and the rest is the loop's business.
func TestFlushIsBoundedUnderSteadyTraffic(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	t.Cleanup(srv.Close)
	srv.SetBatchDelay(100 * time.Millisecond)
	s, counts := newTestSender(srv, 100000)
	s.BatchSize, s.FlushInterval = 100, 200*time.Millisecond
	s.Start()
	const total = 3000
	var accepted atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < total; i++ {
			if s.Enqueue(flagEvent(i)) {
				accepted.Add(1)
			}
			if i%100 == 99 {
				runtime.Gosched()
			}
		}
	}()
	// 1,500 queued events take 1.5 s at 100 ms a batch: more than the
	// flush may take.
	eventually(t, "a backlog", func() bool { return s.Pending() >= 1500 })
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := s.Flush(ctx)
	if took := time.Since(start); took > time.Second {
		t.Errorf("Flush took %v with a 500 ms deadline", took)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("flush of a backlog it cannot send in time: %v, want the deadline", err)
	}
	<-done
	// Nothing was lost: the loop delivers the rest.
	eventually(t, "every event", func() bool { return s.Pending() == 0 })
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	events, _ := srv.Events()
	ids := map[string]bool{}
	for _, e := range events {
		ids[e.DistinctID] = true
	}
	if accepted.Load() != total || len(events) != total || len(ids) != total || counts.dropped.Load() != 0 || counts.sent.Load() != total {
		t.Errorf("accepted %d, delivered %d (%d distinct), sent %d, dropped %d", accepted.Load(), len(events), len(ids),
			counts.sent.Load(), counts.dropped.Load())
	}
}

// A Flush whose events are stuck in a delivery that hangs returns at its
// deadline; the events are delivered when PostHog answers.
func TestFlushReturnsAtItsDeadlineWhileADeliveryHangs(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	t.Cleanup(srv.Close)
	s, counts := newTestSender(srv, 100)
	s.Timeout = time.Minute
	closeSender(t, s, counts)
	release := srv.HoldBatches()
	defer release()
	s.Start()
	for i := 0; i < 10; i++ { // a full batch: the loop sends it at once
		s.Enqueue(flagEvent(i))
	}
	eventually(t, "the delivery to hang", func() bool { return srv.BatchAttempts() == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := s.Flush(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("flush during a hanging delivery: %v", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("Flush took %v with a 200 ms deadline", took)
	}
	release()
	eventually(t, "the delivery", func() bool { return counts.sent.Load() == 10 })
	if counts.dropped.Load() != 0 {
		t.Errorf("%d dropped", counts.dropped.Load())
	}
}

// A stop during a retry's back-off keeps the batch: Close delivers it.
func TestCloseDeliversWhatTheLoopWasRetrying(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	t.Cleanup(srv.Close)
	s, counts := newTestSender(srv, 100)
	s.RetryBackoff = time.Hour // the loop is waiting to retry when it is stopped
	srv.FailNextBatches(http.StatusServiceUnavailable, 1)
	s.Start()
	for i := 0; i < 10; i++ {
		s.Enqueue(flagEvent(i))
	}
	eventually(t, "a failed attempt", func() bool { return srv.BatchAttempts() == 1 })
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if counts.sent.Load() != 10 || counts.dropped.Load() != 0 || s.Pending() != 0 {
		t.Errorf("after close: sent %d, dropped %d, pending %d", counts.sent.Load(), counts.dropped.Load(), s.Pending())
	}
	if s.Enqueue(flagEvent(99)) || <-counts.reasons != "closed" {
		t.Error("an event was accepted after Close")
	}
	if err := s.Close(context.Background()); err != nil {
		t.Errorf("second close: %v", err)
	}
}

// What Close cannot deliver by its deadline is counted as dropped, never left
// unaccounted for.
func TestCloseCountsWhatItCannotDeliver(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	t.Cleanup(srv.Close)
	s, counts := newTestSender(srv, 100)
	s.Timeout = time.Minute
	release := srv.HoldBatches()
	defer release()
	for i := 0; i < 5; i++ {
		s.Enqueue(flagEvent(i))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := s.Close(ctx); err == nil {
		t.Error("close with PostHog hanging reported success")
	}
	if counts.dropped.Load() != 5 || s.Pending() != 0 {
		t.Errorf("after close: dropped %d, pending %d", counts.dropped.Load(), s.Pending())
	}
}

// Under concurrent Enqueue, Flush and Close, every accepted event ends as sent
// or dropped exactly once.
func TestEveryAcceptedEventIsSentOrDroppedOnce(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	t.Cleanup(srv.Close)
	srv.SetBatchDelay(time.Millisecond)
	s, counts := newTestSender(srv, 500)
	s.Start()
	var accepted atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 2000; i++ {
				if s.Enqueue(flagEvent(w*10000 + i)) {
					accepted.Add(1)
				}
			}
		}(w)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 20; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
			_ = s.Flush(ctx)
			cancel()
		}
	}()
	eventually(t, "some deliveries", func() bool { return counts.sent.Load() > 0 })
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	for {
		select {
		case r := <-counts.reasons:
			if r != "closed" && r != "queue_full" {
				t.Errorf("dropped for %q", r)
			}
			continue
		default:
		}
		break
	}
	events, _ := srv.Events()
	if int64(len(events)) != counts.sent.Load() || counts.sent.Load() != accepted.Load() || s.Pending() != 0 {
		t.Errorf("accepted %d, sent %d, delivered %d, pending %d", accepted.Load(), counts.sent.Load(), len(events), s.Pending())
	}
}

package posthog

import (
	"context"
	"net/http"
	"strconv"
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
	counts := &eventCounts{reasons: make(chan string, 100)}
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

func TestSenderBatchesAndDelivers(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	s, counts := newTestSender(srv, 100)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
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
	if e := events[0]; e.Event != "$feature_flag_called" || e.DistinctID != "user-0" || e.Properties["$feature_flag"] != "checkout" || e.Timestamp == "" {
		t.Errorf("event %+v", e)
	}
	cancel()
	<-done
}

func TestSenderNeverBlocksAndCountsDrops(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	s, counts := newTestSender(srv, 5)
	start := time.Now()
	for i := 0; i < 8; i++ {
		s.Enqueue(flagEvent(i)) // nothing is draining the queue
	}
	if time.Since(start) > 100*time.Millisecond || counts.dropped.Load() != 3 || <-counts.reasons != "queue_full" {
		t.Errorf("full queue: took %v, dropped %d", time.Since(start), counts.dropped.Load())
	}
	// Flush delivers what is queued (as on shutdown and reload).
	if err := s.Flush(context.Background()); err != nil || counts.sent.Load() != 5 || s.Pending() != 0 {
		t.Errorf("flush: %v, sent %d, pending %d", err, counts.sent.Load(), s.Pending())
	}
}

func TestSenderRetriesThenDrops(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	s, counts := newTestSender(srv, 100)
	s.MaxRetries = 2

	srv.FailBatchesWith(http.StatusServiceUnavailable)
	s.Enqueue(flagEvent(1))
	go func() { time.Sleep(15 * time.Millisecond); srv.FailBatchesWith(0) }()
	if err := s.Flush(context.Background()); err != nil || counts.sent.Load() != 1 {
		t.Fatalf("a transient 503 was not retried: %v, sent %d", err, counts.sent.Load())
	}

	srv.FailBatchesWith(http.StatusBadRequest)
	s.Enqueue(flagEvent(2))
	if err := s.Flush(context.Background()); err == nil || counts.dropped.Load() != 1 || <-counts.reasons != "refused" {
		t.Errorf("a 400 must drop the batch at once: %v, dropped %d", err, counts.dropped.Load())
	}
	srv.FailBatchesWith(http.StatusInternalServerError)
	s.Enqueue(flagEvent(3))
	if err := s.Flush(context.Background()); err == nil || counts.dropped.Load() != 2 || <-counts.reasons != "retries_exhausted" {
		t.Errorf("retries exhausted: %v, dropped %d", err, counts.dropped.Load())
	}
	events, _ := srv.Events()
	if len(events) != 1 {
		t.Errorf("server got %d events", len(events))
	}
}

func TestSenderStopKeepsUndeliveredForTheFlush(t *testing.T) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	defer srv.Close()
	s, counts := newTestSender(srv, 100)
	s.RetryBackoff = time.Hour // the loop is waiting to retry when it is stopped
	srv.FailBatchesWith(http.StatusServiceUnavailable)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	for i := 0; i < 4; i++ {
		s.Enqueue(flagEvent(i))
	}
	eventually(t, "a failed attempt", func() bool { return srv.BatchAttempts() > 0 })
	cancel()
	<-done
	if s.Pending() != 4 || counts.dropped.Load() != 0 {
		t.Fatalf("after stopping mid-retry: %d pending, %d dropped; want all 4 handed back", s.Pending(), counts.dropped.Load())
	}
	srv.FailBatchesWith(0)
	if err := s.Flush(context.Background()); err != nil || counts.sent.Load() != 4 {
		t.Errorf("flush after the stop: %v, sent %d", err, counts.sent.Load())
	}
}

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
// deliver it counts as dropped.
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
	// (queue full, refused by PostHog, retries exhausted).
	Sent    func(n int)
	Dropped func(n int, reason string)

	queue chan Event
	mu    sync.Mutex // serialises deliveries (Run's loop and Flush)
}

// NewSender returns a sender with a queue of queueSize events (0: the default).
func NewSender(host, projectKey string, queueSize int) *Sender {
	if queueSize <= 0 {
		queueSize = DefaultQueueSize
	}
	return &Sender{Host: host, ProjectAPIKey: projectKey, queue: make(chan Event, queueSize)}
}

// Enqueue queues an event without blocking; it reports false (and counts the
// event as dropped) when the queue is full.
func (s *Sender) Enqueue(e Event) bool {
	select {
	case s.queue <- e:
		return true
	default:
		if s.Dropped != nil {
			s.Dropped(1, "queue_full")
		}
		return false
	}
}

// Pending returns the number of queued events.
func (s *Sender) Pending() int { return len(s.queue) }

// Run delivers queued events until ctx is done. Several Run loops may share a
// sender (a config reload overlaps the old and the new one).
func (s *Sender) Run(ctx context.Context) {
	interval := s.FlushInterval
	if interval <= 0 {
		interval = DefaultFlushInterval
	}
	batch := make([]Event, 0, s.batchSize())
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			if len(batch) > 0 {
				// Hand the partial batch back: the flush after Stop sends it.
				for _, e := range batch {
					s.Enqueue(e)
				}
			}
			return
		case e := <-s.queue:
			batch = append(batch, e)
			if len(batch) < s.batchSize() {
				continue
			}
		case <-ticker.C:
			if len(batch) == 0 {
				continue
			}
		}
		s.deliver(ctx, batch, true)
		batch = batch[:0]
	}
}

// Flush sends everything queued now, within ctx's deadline.
func (s *Sender) Flush(ctx context.Context) error {
	for {
		batch := make([]Event, 0, s.batchSize())
	fill:
		for len(batch) < s.batchSize() {
			select {
			case e := <-s.queue:
				batch = append(batch, e)
			default:
				break fill
			}
		}
		if len(batch) == 0 {
			return nil
		}
		if err := s.deliver(ctx, batch, false); err != nil {
			return err
		}
	}
}

func (s *Sender) batchSize() int {
	if s.BatchSize > 0 {
		return s.BatchSize
	}
	return DefaultBatchSize
}

// deliver posts one batch, retrying transient failures. A request under way
// finishes (within Timeout) even when ctx ends, so that stopping does not
// abort a delivery PostHog may already have accepted. When ctx ends before the
// batch is delivered, requeue hands the events back to the queue, for the
// flush that follows a stop; otherwise they are dropped and counted.
func (s *Sender) deliver(ctx context.Context, batch []Event, requeue bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	body, err := s.encode(batch)
	if err != nil {
		s.drop(len(batch), "encoding")
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
		err = s.post(context.WithoutCancel(ctx), body)
		if err == nil {
			if s.Sent != nil {
				s.Sent(len(batch))
			}
			return nil
		}
		var se *StatusError
		if errors.As(err, &se) && se.StatusCode >= 400 && se.StatusCode < 500 && se.StatusCode != http.StatusTooManyRequests {
			s.drop(len(batch), "refused")
			return err
		}
		if ctx.Err() != nil && requeue {
			for _, e := range batch {
				s.Enqueue(e)
			}
			return err
		}
		if attempt >= retries || ctx.Err() != nil {
			s.drop(len(batch), "retries_exhausted")
			return err
		}
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
		}
		backoff *= 2
	}
}

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

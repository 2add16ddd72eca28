package posthog

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flagsplit/flagsplit/posthog/posthogtest"
)

// benchEvent is a $feature_flag_called event of the size the proxy sends.
func benchEvent(i int) Event {
	id := "user-" + strconv.Itoa(i)
	return Event{Event: "$feature_flag_called", DistinctID: id, Timestamp: time.Now().UTC(),
		UUID: fmt.Sprintf("0190a7d2-%04x-7000-8000-%012x", i&0xffff, i),
		Properties: map[string]any{"$feature_flag": "checkout", "$feature_flag_response": true,
			"$feature/checkout": true, "locally_evaluated": true, "$feature_flag_id": 7, "$feature_flag_version": 50,
			"$lib": Lib, "$lib_version": "v0.0.0", "$geoip_disable": true, "$device_id": "d-" + id}}
}

// benchSender is a sender with the defaults (batch size, deliveries in
// flight, queue) against a loopback stand-in whose /batch/ answers after
// latency.
func benchSender(b *testing.B, latency time.Duration) (*Sender, *atomic.Int64, *atomic.Int64) {
	srv := posthogtest.New(projectKey, personalKey, []byte(defsV1))
	b.Cleanup(srv.Close)
	srv.SetBatchDelay(latency)
	var sent, dropped atomic.Int64
	s := NewSender(srv.URL, projectKey, 0)
	s.Sent = func(n int) { sent.Add(int64(n)) }
	s.Dropped = func(n int, _ string) { dropped.Add(int64(n)) }
	s.Start()
	return s, &sent, &dropped
}

func closeBench(b *testing.B, s *Sender) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		b.Fatalf("close: %v", err)
	}
}

// BenchmarkSenderPaced offers events at a steady rate (one event per new user
// with events on) and reports what was accepted, delivered and dropped.
//
//	go test ./posthog -run '^$' -bench SenderPaced -benchtime 3s
func BenchmarkSenderPaced(b *testing.B) {
	for _, latency := range []time.Duration{0, 100 * time.Millisecond} {
		for _, rate := range []int{1000, 3000, 10000, 30000} {
			b.Run(fmt.Sprintf("latency=%v/rate=%d", latency, rate), func(b *testing.B) {
				s, sent, dropped := benchSender(b, latency)
				// Every millisecond, enqueue what the rate owes since the start:
				// a late tick is made up for, so the average rate holds.
				tick := time.NewTicker(time.Millisecond)
				defer tick.Stop()
				var accepted int64
				start := time.Now()
				b.ResetTimer()
				for i := 0; i < b.N; {
					<-tick.C
					owed := min(int(time.Since(start).Seconds()*float64(rate)), b.N)
					for ; i < owed; i++ {
						if s.Enqueue(benchEvent(i)) {
							accepted++
						}
					}
				}
				offered := time.Since(start)
				b.StopTimer()
				closeBench(b, s)
				if sent.Load()+dropped.Load() != int64(b.N) {
					b.Fatalf("%d offered: sent %d + dropped %d", b.N, sent.Load(), dropped.Load())
				}
				b.ReportMetric(float64(b.N)/offered.Seconds(), "offered/s")
				b.ReportMetric(float64(accepted), "accepted")
				b.ReportMetric(float64(sent.Load()), "delivered")
				b.ReportMetric(100*float64(dropped.Load())/float64(b.N), "dropped%")
			})
		}
	}
}

// BenchmarkSenderEncode is the sender's own CPU cost per event: JSON and gzip
// of a batch of DefaultBatchSize events.
func BenchmarkSenderEncode(b *testing.B) {
	s := NewSender("", projectKey, 0)
	batch := make([]Event, DefaultBatchSize)
	for i := range batch {
		batch[i] = benchEvent(i)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i += len(batch) {
		if _, err := s.encode(batch); err != nil {
			b.Fatal(err)
		}
	}
}

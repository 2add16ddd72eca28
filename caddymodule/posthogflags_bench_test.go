package caddymodule

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// BenchmarkPostHogFlags is the posthog_flags endpoint answering posthog-js's
// flags request (plain JSON body, /flags/?v=2, the v2 shape) for 5 and 50
// flags, every flag decided at the edge:
//
//	go test -run '^$' -bench PostHogFlags -benchmem ./caddymodule/
//
// Each iteration also pays for building the request as Caddy's server does;
// caddy-setup measures that part alone. req/s is one core's rate.
func BenchmarkPostHogFlags(b *testing.B) {
	bodies := make([][]byte, 1024)
	for i := range bodies {
		bodies[i] = fmt.Appendf(nil, `{"token":"phc_bench","distinct_id":"user-%d","groups":{},"$anon_distinct_id":null,`+
			`"person_properties":{"plan":"pro","country":"US","orders":12,"app_version":"2.3.1","$lib":"web","$lib_version":"1.449.2"},`+
			`"group_properties":{},"timezone":"Europe/Paris","$device_id":"0193c1a4-%04d-7000-8000-000000000000"}`, 100000+i, i)
	}
	w := &discardWriter{h: http.Header{}}
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })
	request := func(i int) *http.Request {
		r := httptest.NewRequest(http.MethodPost, "http://shop.example.com/flags/?v=2", bytes.NewReader(bodies[i%len(bodies)]))
		r.Header.Set("Content-Type", "application/json")
		return caddyhttp.PrepareRequest(r, caddy.NewReplacer(), w, benchServer)
	}
	b.Run("caddy-setup", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			if err := next.ServeHTTP(w, request(i)); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
	})
	for _, n := range []int{5, 50} {
		b.Run("flags="+strconv.Itoa(n), func(b *testing.B) {
			app := newTestApp(b, benchDefinitions(n), 100000)
			h := newTestPostHogFlags(b, app)
			// Every answer is local: the endpoint's own cost, no fill-in.
			if err := h.ServeHTTP(w, request(0), next); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				if err := h.ServeHTTP(w, request(i), next); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
		})
	}
}

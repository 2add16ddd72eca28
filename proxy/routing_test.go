package proxy

import (
	"testing"
	"time"
)

type testPool struct {
	dials []string
	down  map[string]bool
}

func (p testPool) Len() int             { return len(p.dials) }
func (p testPool) Dial(i int) string    { return p.dials[i] }
func (p testPool) Available(i int) bool { return !p.down[p.dials[i]] }

func TestSelectRoutesByValueAndFallsBackToDefault(t *testing.T) {
	r, err := NewRouter(map[string]string{"true": "http://new:8080", "variant-b": "b:1", "false": "old:8080"}, "old:8080")
	if err != nil {
		t.Fatal(err)
	}
	pool := testPool{dials: []string{"old:8080", "new:8080", "b:1"}}
	cases := []struct {
		value   string
		decided bool
		down    []string
		want    int
		how     Decision
	}{
		{"true", true, nil, 1, DecisionRoute},
		{"variant-b", true, nil, 2, DecisionRoute},
		{"false", true, nil, 0, DecisionRoute},
		{"variant-c", true, nil, 0, DecisionDefault},
		{"true", false, nil, 0, DecisionDefault}, // inconclusive: always the default
		{"true", true, []string{"new:8080"}, 0, DecisionFallback},
		{"true", true, []string{"new:8080", "old:8080"}, -1, DecisionNone},
		{"variant-c", true, []string{"old:8080"}, -1, DecisionNone},
		{"false", true, []string{"old:8080"}, -1, DecisionNone},
	}
	for _, c := range cases {
		pool.down = map[string]bool{}
		for _, d := range c.down {
			pool.down[d] = true
		}
		i, how := Select(r, pool, c.value, c.decided)
		if i != c.want || how != c.how {
			t.Errorf("%s decided=%v down=%v: got %d %s, want %d %s", c.value, c.decided, c.down, i, how, c.want, c.how)
		}
	}
	if _, err := NewRouter(nil, ""); err == nil {
		t.Error("a router without default was accepted")
	}
}

func TestNormalizeUpstream(t *testing.T) {
	for in, want := range map[string]string{
		"old:8080": "old:8080", "http://old:8080": "old:8080", "http://old": "old:80",
		"https://new/": "new:443", "[::1]:9000": "[::1]:9000", "http://[::1]": "[::1]:80",
	} {
		if got := NormalizeUpstream(in); got != want {
			t.Errorf("NormalizeUpstream(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestOutcomes(t *testing.T) {
	var o Outcomes
	o.Record("f", "true", Outcome{Status: 200, Duration: 2 * time.Millisecond})
	o.Record("f", "true", Outcome{Status: 502, Duration: 4 * time.Millisecond})
	o.Record("f", "false", Outcome{Status: 0})
	o.Record("a", "x", Outcome{Status: 404})
	s := o.Snapshot()
	if len(s) != 3 || s[0].Flag != "a" || s[1].Variant != "false" {
		t.Fatalf("snapshot %+v", s)
	}
	if s[2].Requests != 2 || s[2].Errors != 1 || s[2].MeanLatencyMS != 3 || s[1].Errors != 1 || s[0].Errors != 0 {
		t.Errorf("counts %+v", s)
	}
	for status, want := range map[int]string{101: "1xx", 204: "2xx", 304: "3xx", 404: "4xx", 503: "5xx", 0: "error", 700: "error"} {
		if CodeClass(status) != want {
			t.Errorf("CodeClass(%d) = %s", status, CodeClass(status))
		}
	}
}

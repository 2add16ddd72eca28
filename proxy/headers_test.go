package proxy

import (
	"net/http"
	"testing"
)

func TestFlagHeaderName(t *testing.T) {
	cases := map[string]string{
		"new-checkout-flow": "X-Feature-Flag-New-Checkout-Flow",
		"homepage_hero":     "X-Feature-Flag-Homepage_hero",
		"with space/slash":  "X-Feature-Flag-With-Space-Slash",
	}
	for key, want := range cases {
		if got := FlagHeaderName(key); got != want {
			t.Errorf("FlagHeaderName(%q) = %q, want %q", key, got, want)
		}
	}
}

func TestStripClientHeadersRemovesEveryCopy(t *testing.T) {
	h := http.Header{}
	h.Set("X-Feature-Flag-New-Checkout-Flow", "true")
	h["x-feature-flag-lowercase"] = []string{"variant-b"} // not canonicalised, e.g. from HTTP/2
	h.Set("X-PostHog-Distinct-Id", "spoofed")
	h.Set("X-Feature-Flags", "kept: not our prefix")
	h.Set("Accept", "text/html")
	StripClientHeaders(h)
	if len(h) != 2 || h.Get("Accept") == "" || h.Get("X-Feature-Flags") == "" {
		t.Errorf("left %v", h)
	}
}

func TestHeaderWriterSetsOneValuePerFlag(t *testing.T) {
	hw := HeaderWriter{Names: []string{FlagHeaderName("a"), FlagHeaderName("b")}}
	h := http.Header{}
	values := []string{"true", "variant-b"}
	hw.Set(h, "user-1", func(i int) string { return values[i] })
	if h.Get("X-PostHog-Distinct-Id") != "user-1" || h.Get("X-Feature-Flag-a") != "true" || h.Get("X-Feature-Flag-b") != "variant-b" {
		t.Errorf("headers %v", h)
	}
	// Appending to one header must not write into another's value.
	h.Add("X-Feature-Flag-a", "extra")
	if h.Get("X-Feature-Flag-b") != "variant-b" || len(h.Values("X-Feature-Flag-a")) != 2 {
		t.Errorf("values share storage: %v", h)
	}
}

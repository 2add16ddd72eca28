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

func TestHeaderWriterReplacesClientHeaders(t *testing.T) {
	for _, n := range []int{2, rebuildFrom, 20} {
		hw := HeaderWriter{}
		values := make([]string, n)
		for i := range values {
			hw.Names = append(hw.Names, FlagHeaderName("flag-"+string(rune('a'+i))))
			values[i] = "v" + string(rune('a'+i))
		}
		r, _ := http.NewRequest(http.MethodGet, "http://x/", nil)
		r.Header.Set("Accept", "text/html")
		r.Header.Set("X-Feature-Flag-Flag-A", "spoofed")
		r.Header["x-feature-flag-other"] = []string{"spoofed"}
		r.Header.Set("X-Posthog-Distinct-Id", "spoofed")
		hw.Apply(r, "user-1", func(i int) string { return values[i] })
		h := r.Header
		if h.Get("Accept") != "text/html" || h.Get("X-PostHog-Distinct-Id") != "user-1" || len(h["x-feature-flag-other"]) != 0 {
			t.Errorf("%d flags: headers %v", n, h)
		}
		for i, name := range hw.Names {
			if got := h[name]; len(got) != 1 || got[0] != values[i] {
				t.Errorf("%d flags: %s = %q, want %q", n, name, got, values[i])
			}
		}
		if len(h) != n+2 {
			t.Errorf("%d flags: %d headers: %v", n, len(h), h)
		}
		// Appending to one header must not write into another's value.
		h.Add(hw.Names[0], "extra")
		if h.Get(hw.Names[1]) != values[1] || len(h.Values(hw.Names[0])) != 2 {
			t.Errorf("values share storage: %v", h)
		}
	}
}

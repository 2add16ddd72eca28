package proxy

import (
	"fmt"
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
	h.Set("X-Feature-Flags", "beta")
	h.Set("X-Feature-Flagship", "kept: not our prefix")
	h.Set("Accept", "text/html")
	StripClientHeaders(h)
	if len(h) != 2 || h.Get("Accept") == "" || h.Get("X-Feature-Flagship") == "" {
		t.Errorf("left %v", h)
	}
}

// Row 3: spellings a CGI/WSGI backend reads as flagsplit's headers are
// stripped too.
func TestStripClientHeadersRemovesEverySpellingABackendFolds(t *testing.T) {
	for _, name := range []string{
		"X_Feature_Flag_new_checkout_flow", "x_feature_flag_beta", "X.Feature.Flag.Beta",
		"X-Feature_Flag-beta", "X_POSTHOG_DISTINCT_ID", "x.posthog-distinct_id", "X_Feature_Flags",
	} {
		h := http.Header{name: {"spoofed"}, "Accept": {"*/*"}}
		StripClientHeaders(h)
		if _, ok := h[name]; ok || len(h) != 1 {
			t.Errorf("%s survived: %v", name, h)
		}
	}
	for _, name := range []string{"X-Feature-Flagship", "X_Feature", "X-Posthog-Distinct-Id-Extra", "X-Feature-Flags2"} {
		h := http.Header{name: {"v"}}
		StripClientHeaders(h)
		if len(h) != 1 {
			t.Errorf("%s was stripped", name)
		}
	}
}

// Row 2: a Connection header naming flagsplit's headers loses those tokens
// (and keeps the others), so reverse_proxy does not drop our headers as
// hop-by-hop.
func TestStripClientHeadersRemovesOurNamesFromConnection(t *testing.T) {
	h := http.Header{"Connection": {"keep-alive, X-Feature-Flag-New-Checkout-Flow", "x_posthog_distinct_id,X-Custom , X-Feature-Flags"}}
	StripClientHeaders(h)
	if got := h["Connection"]; len(got) != 1 || got[0] != "keep-alive, X-Custom" {
		t.Errorf("Connection = %q", got)
	}
	h = http.Header{"Connection": {"X-Feature-Flag-Beta, X-PostHog-Distinct-Id"}}
	StripClientHeaders(h)
	if _, ok := h["Connection"]; ok {
		t.Errorf("Connection left with only our names removed: %q", h["Connection"])
	}
	h = http.Header{"Connection": {"close"}}
	StripClientHeaders(h)
	if got := h["Connection"]; len(got) != 1 || got[0] != "close" {
		t.Errorf("an unrelated Connection changed: %q", got)
	}
}

// Row 10: keys whose headers a backend reads as one get no per-flag header.
func TestCollidingFlagHeadersAreLeftOut(t *testing.T) {
	keys := []string{"beta", "ok", "Beta", "sp ace", "sp-ace", "dash-key", "dash_key", "a.b", "a-b", "solo"}
	names, collisions := FlagHeaderNames(keys)
	want := map[string]bool{"ok": true, "solo": true}
	for i, key := range keys {
		if (names[i] != "") != want[key] {
			t.Errorf("%q: header %q", key, names[i])
		}
	}
	var got string
	for _, c := range collisions {
		got += fmt.Sprint(c.Header, " ", c.Keys)
	}
	wantC := "x-feature-flag-a-b [a-b a.b]x-feature-flag-beta [Beta beta]x-feature-flag-dash-key [dash-key dash_key]x-feature-flag-sp-ace [sp ace sp-ace]"
	if got != wantC {
		t.Errorf("collisions\n got %s\nwant %s", got, wantC)
	}
	hw, c := NewHeaderWriter(HeadersPerFlag, keys)
	if hw.FlagHeaders() != 2 || len(c) != 4 {
		t.Errorf("writer sends %d flag headers, %d collisions", hw.FlagHeaders(), len(c))
	}
	r, _ := http.NewRequest(http.MethodGet, "http://x/", nil)
	hw.Apply(r, "u", func(i int) string { return keys[i] }, nil)
	if len(r.Header) != 3 || r.Header.Get("X-Feature-Flag-Ok") != "ok" || r.Header.Get("X-Feature-Flag-Solo") != "solo" {
		t.Errorf("headers %v", r.Header)
	}
	if _, c := NewHeaderWriter(HeadersDictionary, keys); len(c) != 0 {
		t.Errorf("dictionary keys collide: %v", c)
	}
}

func TestHeaderWriterReplacesClientHeaders(t *testing.T) {
	for _, n := range []int{2, 7, 8, rebuildFrom, 20} {
		for _, scratch := range []*HeaderScratch{nil, new(HeaderScratch)} {
			testHeaderWriter(t, n, scratch)
		}
	}
}

func testHeaderWriter(t *testing.T, n int, scratch *HeaderScratch) {
	{
		var keys []string
		values := make([]string, n)
		for i := range values {
			keys = append(keys, "flag-"+string(rune('a'+i)))
			values[i] = "v" + string(rune('a'+i))
		}
		hw, _ := NewHeaderWriter(HeadersPerFlag, keys)
		r, _ := http.NewRequest(http.MethodGet, "http://x/", nil)
		r.Header.Set("Accept", "text/html")
		r.Header.Set("X-Feature-Flag-Flag-A", "spoofed")
		r.Header["x-feature-flag-other"] = []string{"spoofed"}
		r.Header["X_Feature_Flag_flag_b"] = []string{"spoofed"}
		r.Header.Set("X-Posthog-Distinct-Id", "spoofed")
		r.Header.Set("Connection", "X-Feature-Flag-Flag-A, Upgrade")
		hw.Apply(r, "user-1", func(i int) string { return values[i] }, scratch)
		h := r.Header
		if h.Get("Accept") != "text/html" || h.Get("X-PostHog-Distinct-Id") != "user-1" || len(h["x-feature-flag-other"]) != 0 || h.Get("Connection") != "Upgrade" {
			t.Errorf("%d flags: headers %v", n, h)
		}
		for i, key := range keys {
			name := FlagHeaderName(key)
			if got := h[name]; len(got) != 1 || got[0] != values[i] {
				t.Errorf("%d flags: %s = %q, want %q", n, name, got, values[i])
			}
		}
		if len(h) != n+3 {
			t.Errorf("%d flags: %d headers: %v", n, len(h), h)
		}
		// Appending to one header must not write into another's value.
		first, second := FlagHeaderName(keys[0]), FlagHeaderName(keys[1])
		h.Add(first, "extra")
		if h.Get(second) != values[1] || len(h.Values(first)) != 2 {
			t.Errorf("values share storage: %v", h)
		}
	}
}

func TestHeaderFormsDictionaryAndOff(t *testing.T) {
	keys := []string{"new-checkout-flow", "homepage-hero", "beta"}
	values := []string{"true", "variant-b", "false"}
	for _, mode := range []HeaderMode{HeadersDictionary, HeadersOff} {
		hw, _ := NewHeaderWriter(mode, keys)
		r, _ := http.NewRequest(http.MethodGet, "http://x/", nil)
		r.Header.Set("X-Feature-Flags", "beta")
		r.Header.Set("X-Feature-Flag-Beta", "true")
		r.Header.Set("Accept", "*/*")
		hw.Apply(r, "user-1", func(i int) string { return values[i] }, nil)
		want := http.Header{"Accept": {"*/*"}, "X-Posthog-Distinct-Id": {"user-1"}}
		if mode == HeadersDictionary {
			want["X-Feature-Flags"] = []string{`new-checkout-flow, homepage-hero="variant-b", beta=?0`}
		}
		if fmt.Sprint(r.Header) != fmt.Sprint(want) {
			t.Errorf("%v: headers %v, want %v", mode, r.Header, want)
		}
	}
	for _, s := range []string{"per_flag", "dictionary", "off"} {
		if m, err := ParseHeaderMode(s); err != nil || m.String() != s {
			t.Errorf("ParseHeaderMode(%q) = %v, %v", s, m, err)
		}
	}
	if _, err := ParseHeaderMode("json"); err == nil {
		t.Error("ParseHeaderMode accepted json")
	}
}

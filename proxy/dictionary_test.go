package proxy

import (
	"net/http"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/dunglas/httpsfv"
)

// parseDictionary reads an X-Feature-Flags value with httpsfv, an
// independent RFC 8941/9651 parser, and returns each flag's value spelled as
// its per-flag header would be (true, false or the variant).
func parseDictionary(t testing.TB, header string) map[string]string {
	t.Helper()
	d, err := httpsfv.UnmarshalDictionary([]string{header})
	if err != nil {
		t.Fatalf("httpsfv refuses %q: %v", header, err)
	}
	out := map[string]string{}
	for _, name := range d.Names() {
		m, _ := d.Get(name)
		item, ok := m.(httpsfv.Item)
		if !ok {
			t.Fatalf("%s: not an item: %#v", name, m)
		}
		flag, ok := DecodeDictionaryKey(name)
		if !ok {
			t.Fatalf("key %q does not decode", name)
		}
		switch v := item.Value.(type) {
		case bool:
			if v {
				out[flag] = "true"
			} else {
				out[flag] = "false"
			}
		case string:
			out[flag] = v
		case httpsfv.DisplayString:
			out[flag] = string(v)
		default:
			t.Fatalf("%s: value of type %T", name, item.Value)
		}
	}
	return out
}

// dictionaryOf writes the dictionary of keys[i] = values[i].
func dictionaryOf(keys, values []string) string {
	d := NewDictionaryWriter(keys)
	return d.String(func(i int) string { return values[i] })
}

func TestDictionaryParsesToTheFlagValues(t *testing.T) {
	// Every character PostHog allows in a key, alone and in each position,
	// then keys only a hand-written file could hold.
	var keys []string
	const posthog = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
	for _, c := range posthog {
		keys = append(keys, string(c), "k"+string(c), string(c)+"-v")
	}
	keys = append(keys, "new-checkout-flow", "homepage_hero", "Beta", "beta", "BETA", "2fa", "sp ace", "a.b",
		".a", "*", "a*b", "*2a", "café", "日本", "emoji-😀", "tab\tkey", "quote\"key", "per%cent", "semi;colon", "comma,key", "eq=key")
	variants := []string{"true", "false", "variant-b", "control", "with space", `quote"d`, `back\slash`, `\"`,
		"café", "日本語", "percent%20", `%"`, "", "tab\there", "TRUE", "True", "?0", "a=b, c", "😀"}
	values := make([]string, len(keys))
	for i := range keys {
		values[i] = variants[i%len(variants)]
	}
	header := dictionaryOf(keys, values)
	got := parseDictionary(t, header)
	if len(got) != len(keys) {
		t.Fatalf("%d members, want %d (keys collide?)", len(got), len(keys))
	}
	for i, k := range keys {
		if got[k] != values[i] {
			t.Errorf("flag %q: parsed %q, want %q", k, got[k], values[i])
		}
	}
	// The one the README shows.
	if h := dictionaryOf([]string{"new-checkout-flow", "homepage-hero", "beta"}, []string{"true", "variant-b", "false"}); h != `new-checkout-flow, homepage-hero="variant-b", beta=?0` {
		t.Errorf("example: %s", h)
	}
	// httpsfv's own serialisation of what it parsed is ours, byte for byte
	// (our writer is canonical).
	d, _ := httpsfv.UnmarshalDictionary([]string{header})
	if again, err := httpsfv.Marshal(d); err != nil || again != header {
		t.Errorf("not canonical:\n ours   %s\n httpsfv %s (%v)", header, again, err)
	}
}

func TestDictionaryKeyMapping(t *testing.T) {
	for flag, want := range map[string]string{
		"new-checkout-flow": "new-checkout-flow", "homepage_hero": "homepage_hero",
		"Beta": "*42eta", "2fa": "*32fa", "sp ace": "sp*20ace", "a*b": "a*2ab", "café": "caf*c3*a9", "-x": "*2dx",
	} {
		if got := DictionaryKey(flag); got != want {
			t.Errorf("DictionaryKey(%q) = %q, want %q", flag, got, want)
		}
		if back, ok := DecodeDictionaryKey(want); !ok || back != flag {
			t.Errorf("DecodeDictionaryKey(%q) = %q, %v", want, back, ok)
		}
	}
	for _, bad := range []string{"a*", "a*4", "a*4G", "*zz", ""} {
		if _, ok := DecodeDictionaryKey(bad); ok {
			t.Errorf("DecodeDictionaryKey(%q) accepted", bad)
		}
	}
}

func TestDictionaryWriterAllocatesOnce(t *testing.T) {
	keys := []string{"new-checkout-flow", "homepage-hero", "beta", "Upper", "x"}
	values := []string{"true", "variant-b", "false", `q"uote`, "café"}
	d := NewDictionaryWriter(keys)
	fn := func(i int) string { return values[i] }
	s := d.String(fn)
	if len(s) != d.Len(fn) {
		t.Errorf("Len %d, written %d", d.Len(fn), len(s))
	}
	if string(d.AppendTo(nil, fn)) != s {
		t.Errorf("AppendTo differs from String")
	}
	if n := testing.AllocsPerRun(100, func() { _ = d.String(fn) }); n != 1 {
		t.Errorf("String: %v allocations, want 1", n)
	}
	buf := make([]byte, 0, 256)
	if n := testing.AllocsPerRun(100, func() { buf = d.AppendTo(buf[:0], fn) }); n != 0 {
		t.Errorf("AppendTo: %v allocations, want 0", n)
	}
	hw, _ := NewHeaderWriter(HeadersDictionary, keys)
	r, _ := http.NewRequest(http.MethodGet, "http://x/", nil)
	r.Header.Set("Accept", "*/*")
	// The header's value and the one array holding both values.
	if n := testing.AllocsPerRun(100, func() { hw.Apply(r, "user-1", fn, nil) }); n != 2 {
		t.Errorf("Apply: %v allocations, want 2", n)
	}
	// With the request's scratch, none.
	scratch := new(HeaderScratch)
	if n := testing.AllocsPerRun(100, func() { hw.Apply(r, "user-1", fn, scratch) }); n != 0 {
		t.Errorf("Apply with scratch: %v allocations, want 0", n)
	}
	if got := parseDictionary(t, r.Header.Get("X-Feature-Flags")); len(got) != len(keys) || got["Upper"] != `q"uote` {
		t.Errorf("dictionary written in the scratch: %v", got)
	}
}

func FuzzDictionary(f *testing.F) {
	f.Add("new-checkout-flow", "variant-b", "Beta", "true")
	f.Add("café", `q"\`, "2fa", "false")
	f.Add("*", "%", " ", "\x00")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		if k1 == "" || k2 == "" || k1 == k2 || !utf8.ValidString(v1) || !utf8.ValidString(v2) {
			return // flag keys are unique and non-empty; variants come from JSON
		}
		header := dictionaryOf([]string{k1, k2}, []string{v1, v2})
		got := parseDictionary(t, header)
		if got[k1] != v1 || got[k2] != v2 || len(got) != 2 {
			t.Errorf("%q parsed to %q", header, got)
		}
		if strings.ContainsAny(header, "\r\n") {
			t.Errorf("header holds a line break: %q", header)
		}
	})
}

package proxy

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"unicode/utf8"
)

// posthogJSCookie builds a cookie value the way posthog-js writes it.
func posthogJSCookie(t testing.TB, state map[string]any) string {
	t.Helper()
	b, err := json.Marshal(state)
	if err != nil {
		t.Fatal(err)
	}
	return encodeURIComponent(string(b))
}

func TestParsePostHogCookieReadsWhatPostHogJSWrites(t *testing.T) {
	raw := posthogJSCookie(t, map[string]any{
		"distinct_id":               "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
		"$device_id":                "0190a1b2-0000-7e5f-8a9b-0c1d2e3f4a5b",
		"$user_state":               "anonymous",
		"$sesid":                    []any{1732471234567, "0193-session", 1732471200000},
		"$initial_person_info":      map[string]any{"r": "$direct", "u": "https://shop.example.com/?a=b&c=d"},
		"$enabled_feature_flags":    map[string]any{"new-checkout-flow": true, "homepage-hero": "variant-b"},
		"$stored_person_properties": nil,
	})
	st, err := ParsePostHogCookie(raw)
	if err != nil {
		t.Fatal(err)
	}
	if st.DistinctID != "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b" || st.DeviceID != "0190a1b2-0000-7e5f-8a9b-0c1d2e3f4a5b" {
		t.Errorf("got %+v", st)
	}
	// Identified users: distinct_id differs from the device id, may hold any text.
	st, err = ParsePostHogCookie(posthogJSCookie(t, map[string]any{"$device_id": "dev", "distinct_id": "jane@example.com \"quoted\" ünïcode 😀"}))
	if err != nil || st.DistinctID != "jane@example.com \"quoted\" ünïcode 😀" || st.DeviceID != "dev" {
		t.Errorf("got %+v %v", st, err)
	}
	// Unescaped cookies (set by other tools) are read too.
	if st, err := ParsePostHogCookie(`{"distinct_id":"plain"}`); err != nil || st.DistinctID != "plain" {
		t.Errorf("unescaped: %+v %v", st, err)
	}
	if st, err := ParsePostHogCookie(`{"distinct_id":12345}`); err != nil || st.DistinctID != "12345" {
		t.Errorf("numeric id: %+v %v", st, err)
	}
}

func TestParsePostHogCookieRejectsMalformedValues(t *testing.T) {
	for _, raw := range []string{
		"", "%", "%zz", "%7B%22distinct_id", "not json", `{"distinct_id":"a"`, `{"distinct_id":"a",}`,
		`{"distinct_id":"a"} trailing`, `["distinct_id","a"]`, `{"distinct_id":"\x01"}`, `{"a":tru}`,
		`{"distinct_id":"\u12"}`, "%C3%28", `{"a":` + strings.Repeat("[", 100) + strings.Repeat("]", 100) + `}`,
	} {
		if st, err := ParsePostHogCookie(raw); err == nil {
			t.Errorf("ParsePostHogCookie(%q) = %+v, want an error", raw, st)
		}
	}
}

// FuzzParsePostHogCookie checks the hand-written scanner against encoding/json:
// whenever encoding/json reads the document as an object, the scanner must find
// the same ids, and it must never panic on anything.
func FuzzParsePostHogCookie(f *testing.F) {
	for _, seed := range []string{
		`{"distinct_id":"abc","$device_id":"def"}`,
		`{"$sesid":[1,"x",2],"distinct_id":"a\"b\\c\u00e9\ud83d\ude00","nested":{"a":[{"b":null}]}}`,
		`{"distinct_id":"\ud800x"}`, `{"distinct_id":-1.5e3}`, `{}`, `{"distinct_id":null}`,
		"%7B%22distinct_id%22%3A%22x%22%7D", `{"distinct_id":"a","distinct_id":"b"}`,
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, doc string) {
		st, err := ParsePostHogCookie(doc)
		decoded, ok := decodeURIComponent(doc)
		if !ok {
			if err == nil {
				t.Fatalf("accepted a malformed escape: %q", doc)
			}
			return
		}
		if !utf8.ValidString(decoded) {
			if err == nil {
				t.Fatalf("accepted invalid UTF-8: %q", decoded)
			}
			return // decodeURIComponent in a browser throws on it too
		}
		var oracle map[string]json.RawMessage
		if json.Unmarshal([]byte(decoded), &oracle) != nil || oracle == nil {
			return // the scanner may be stricter or laxer only where JSON itself is invalid
		}
		if err != nil {
			if strings.Count(decoded, "[")+strings.Count(decoded, "{") > maxJSONDepth {
				return
			}
			t.Fatalf("rejected a valid document %q: %v", decoded, err)
		}
		want := func(field string) string {
			raw, ok := oracle[field]
			if !ok {
				return ""
			}
			var s string
			if json.Unmarshal(raw, &s) == nil {
				return s
			}
			var n json.Number
			if json.Unmarshal(raw, &n) == nil {
				return string(raw)
			}
			return ""
		}
		if st.DistinctID != want("distinct_id") || st.DeviceID != want("$device_id") {
			t.Fatalf("%q: scanner %+v, encoding/json %q / %q", decoded, st, want("distinct_id"), want("$device_id"))
		}
	})
}

func newRequest(headers map[string]string, cookies ...*http.Cookie) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "http://shop.example.com/", nil)
	for k, v := range headers {
		r.Header.Set(k, v)
	}
	for _, c := range cookies {
		r.AddCookie(c)
	}
	return r
}

func TestResolverTriesSourcesInOrder(t *testing.T) {
	phCookie := &http.Cookie{Name: "ph_phc_abc_posthog", Value: posthogJSCookie(t, map[string]any{"distinct_id": "from-cookie", "$device_id": "device-1"})}
	r := NewResolver(nil, "", false)

	id, bad := r.Resolve(newRequest(map[string]string{"X-Posthog-Distinct-Id": " from-header "}, phCookie), nil)
	if id.DistinctID != "from-header" || id.Source != SourceHeader || bad != 0 {
		t.Errorf("header first: %+v %v", id, bad)
	}
	id, _ = r.Resolve(newRequest(nil, &http.Cookie{Name: "other", Value: "x"}, phCookie), nil)
	if id.DistinctID != "from-cookie" || id.DeviceID != "device-1" || id.Source != SourcePostHogCookie {
		t.Errorf("cookie second: %+v", id)
	}
	id, _ = r.Resolve(newRequest(nil), nil)
	if id.DistinctID != "" || id.Source != SourceNone {
		t.Errorf("nothing: %+v", id)
	}

	// A project key pins the cookie name.
	pinned := NewResolver([]Source{{Kind: SourcePostHogCookie}}, "phc_other", false)
	if id, _ := pinned.Resolve(newRequest(nil, phCookie), nil); id.DistinctID != "" {
		t.Errorf("read another project's cookie: %+v", id)
	}
	if PostHogCookieName("phc_a+b/c=") != "ph_phc_aPLbSLcEQ_posthog" {
		t.Errorf("cookie name: %s", PostHogCookieName("phc_a+b/c="))
	}

	custom := NewResolver([]Source{
		{Kind: SourcePlaceholder, Name: "{http.auth.user.id}"},
		{Kind: SourceCookie, Name: "uid"},
	}, "", false)
	id, _ = custom.Resolve(newRequest(nil, &http.Cookie{Name: "uid", Value: `"user-7"`}), placeholderFunc(func(ph string) string {
		if ph != "{http.auth.user.id}" {
			t.Errorf("placeholder %q", ph)
		}
		return ""
	}))
	if id.DistinctID != "user-7" || id.Source != SourceCookie {
		t.Errorf("custom chain: %+v", id)
	}
}

func TestMalformedIdentitiesAreSkippedNotFatal(t *testing.T) {
	r := NewResolver(nil, "", false)
	for _, req := range []*http.Request{
		newRequest(nil, &http.Cookie{Name: "ph_x_posthog", Value: "%7Bbroken"}),
		newRequest(map[string]string{"X-Posthog-Distinct-Id": strings.Repeat("a", MaxIDLength+1)}),
		newRequest(nil, &http.Cookie{Name: "ph_x_posthog", Value: posthogJSCookie(t, map[string]any{"distinct_id": ""})}),
	} {
		id, bad := r.Resolve(req, nil)
		if id.DistinctID != "" || bad == 0 {
			t.Errorf("%v: got %+v, malformed=%v", req.Header, id, bad)
		}
	}
	// A malformed header falls through to a good cookie.
	good := &http.Cookie{Name: "ph_x_posthog", Value: posthogJSCookie(t, map[string]any{"distinct_id": "ok"})}
	id, bad := r.Resolve(newRequest(map[string]string{"X-Posthog-Distinct-Id": strings.Repeat("a", 500)}, good), nil)
	if id.DistinctID != "ok" || bad != SourceSet(0).Add(SourceHeader) {
		t.Errorf("fallthrough: %+v %v", id, bad)
	}
}

func TestAssignedIdentitySticks(t *testing.T) {
	for _, key := range []string{"", "phc_project"} {
		r := NewResolver([]Source{{Kind: SourceHeader, Name: "X-User"}}, key, true)
		id, cookie, err := r.Assign(CookieOptions{Secure: true})
		if err != nil {
			t.Fatal(err)
		}
		if len(id.DistinctID) != 36 || id.DistinctID[14] != '7' || id.Source != SourceAssigned {
			t.Errorf("not a UUIDv7: %+v", id)
		}
		if cookie.HttpOnly || !cookie.Secure || cookie.Path != "/" || cookie.SameSite != http.SameSiteLaxMode || cookie.MaxAge != 365*24*3600 {
			t.Errorf("cookie attributes: %+v", cookie)
		}
		if key != "" {
			if cookie.Name != "ph_phc_project_posthog" {
				t.Errorf("cookie name %s", cookie.Name)
			}
			// posthog-js decodes it with decodeURIComponent + JSON.parse.
			decoded, err := url.PathUnescape(cookie.Value)
			if err != nil {
				t.Fatal(err)
			}
			var state map[string]string
			if err := json.Unmarshal([]byte(decoded), &state); err != nil {
				t.Fatalf("%q: %v", decoded, err)
			}
			if state["distinct_id"] != id.DistinctID || state["$device_id"] != id.DistinctID || state["$user_state"] != "anonymous" {
				t.Errorf("state %v", state)
			}
		} else if cookie.Name != AssignedCookieName || cookie.Value != id.DistinctID {
			t.Errorf("cookie %+v", cookie)
		}
		// The next request carries the cookie and resolves to the same id.
		again, _ := r.Resolve(newRequest(nil, cookie), nil)
		if again.DistinctID != id.DistinctID {
			t.Errorf("project key %q: assigned %s, read back %+v", key, id.DistinctID, again)
		}
	}
}

func TestURIComponentRoundTrip(t *testing.T) {
	for _, s := range []string{"", "abc", `{"a":"b c;d,e=f%g"}`, "ünï😀", "-_.!~*'()"} {
		enc := encodeURIComponent(s)
		if strings.ContainsAny(enc, " ;,\"") {
			t.Errorf("%q encoded to %q", s, enc)
		}
		if dec, ok := decodeURIComponent(enc); !ok || dec != s {
			t.Errorf("round trip of %q: %q %v", s, dec, ok)
		}
	}
	if encodeURIComponent("-_.!~*'()") != "-_.!~*'()" {
		t.Error("unreserved characters must stay")
	}
}

// Row 15 of the hostile-input list: every value an id cannot be is skipped
// for the next source and reported, including an empty header and a value
// that is not UTF-8.
func TestInvalidIdentityValuesFallThroughAndAreReported(t *testing.T) {
	good := &http.Cookie{Name: "ph_x_posthog", Value: posthogJSCookie(t, map[string]any{"distinct_id": "from-cookie"})}
	r := NewResolver(nil, "", false)
	for name, value := range map[string]string{
		"invalid UTF-8":     "user-\xff\xfe",
		"empty":             "",
		"only spaces":       "   ",
		"control character": "user\x01-1",
		"DEL":               "user\x7f",
		"over-long":         strings.Repeat("é", MaxIDLength/2+1),
	} {
		req := newRequest(nil, good)
		req.Header["X-Posthog-Distinct-Id"] = []string{value}
		id, bad := r.Resolve(req, nil)
		if id.DistinctID != "from-cookie" || id.Source != SourcePostHogCookie {
			t.Errorf("%s: resolved %+v, want the cookie's id", name, id)
		}
		if !bad.Has(SourceHeader) || bad.Has(SourcePostHogCookie) {
			t.Errorf("%s: malformed = %b, want the header only", name, bad)
		}
	}
	// An empty id cookie is malformed too; an absent one is not.
	custom := NewResolver([]Source{{Kind: SourceCookie, Name: "uid"}, {Kind: SourceHeader, Name: "X-User"}}, "", false)
	req := newRequest(map[string]string{"X-User": "u-2"}, &http.Cookie{Name: "uid", Value: ""})
	if id, bad := custom.Resolve(req, nil); id.DistinctID != "u-2" || !bad.Has(SourceCookie) {
		t.Errorf("empty cookie: %+v %b", id, bad)
	}
	if _, bad := custom.Resolve(newRequest(map[string]string{"X-User": "u-2"}), nil); bad != 0 {
		t.Errorf("absent cookie reported malformed: %b", bad)
	}
}

// Row 8: a posthog-js cookie flagsplit cannot read is recognised as the
// cookie assigned ids would be written to, so the handler does not store a
// new id over it.
func TestUnreadablePostHogCookieIsNotAnAssignTarget(t *testing.T) {
	r := NewResolver(nil, "phc_project", true)
	deep := strings.Repeat(`{"a":`, maxJSONDepth+2) + "1" + strings.Repeat("}", maxJSONDepth+2)
	for name, value := range map[string]string{
		"nesting > 64":         encodeURIComponent(`{"distinct_id":"u","x":` + deep + `}`),
		"240-byte distinct_id": posthogJSCookie(t, map[string]any{"distinct_id": strings.Repeat("a", 240)}),
		"not JSON":             "%7Bbroken",
	} {
		req := newRequest(nil, &http.Cookie{Name: "ph_phc_project_posthog", Value: value})
		id, bad := r.Resolve(req, nil)
		if id.DistinctID != "" || !bad.Has(SourcePostHogCookie) {
			t.Errorf("%s: %+v %b", name, id, bad)
		}
		if !r.HoldsAssignCookie(req) {
			t.Errorf("%s: the unreadable cookie is not seen as the assign cookie", name)
		}
	}
	if r.HoldsAssignCookie(newRequest(nil, &http.Cookie{Name: "ph_other_posthog", Value: "x"})) {
		t.Error("another project's cookie taken for ours")
	}
}

type placeholderFunc func(string) string

func (f placeholderFunc) ReplaceAll(input, _ string) string { return f(input) }

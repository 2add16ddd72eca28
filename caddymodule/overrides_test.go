package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/storedoc/storedoctest"
)

const overridesTestDefs = `{"flags": [
	{"key": "checkout", "active": true, "filters": {"groups": [{"rollout_percentage": 100}]}},
	{"key": "hero", "active": true, "filters": {"groups": [{}], "multivariate": {"variants": [
		{"key": "control", "rollout_percentage": 50}, {"key": "test", "rollout_percentage": 50}]}}}]}`

func pct(p float64) *float64 { return &p }

// checkoutFor is what a's definitions in force answer for checkout.
func checkoutFor(app *testApp, id string) eval.Result {
	return app.engine.definitions().Evaluate("checkout", &eval.Subject{DistinctID: id})
}

// The interleaving that flipped a kill switch back: the storage sync reads the
// overrides document, an operator's kill switch is stored and put in force,
// and then the sync goes on with the older document it read. The kill switch
// must stay in force.
func TestANewerOverrideIsNeverRevertedByAStaleSync(t *testing.T) {
	st := storedoctest.NewMemory()
	a := newTestAppOn(t, st, []byte(overridesTestDefs), 0)
	b := newTestAppOn(t, st, []byte(overridesTestDefs), 0)
	ctx := context.Background()
	// Another instance caps checkout at 10 %: revision 1, which a has not
	// seen yet.
	if _, err := b.setOverride(ctx, "checkout", &eval.Override{RolloutPercentage: pct(10)}, nil); err != nil {
		t.Fatal(err)
	}

	pause := st.PauseLoad(a.docs.overrides.Key())
	synced := make(chan error, 1)
	go func() { synced <- a.syncOverrides(ctx) }()
	<-pause.Loaded() // the sync holds revision 1

	// The operator kills checkout on a.
	ch, err := a.setOverride(ctx, "checkout", &eval.Override{Killed: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ch.old == nil || ch.old.RolloutPercentage == nil || *ch.old.RolloutPercentage != 10 || !ch.new.Killed {
		t.Errorf("the change was made on %+v, not on the newest document", ch.old)
	}
	if r := checkoutFor(a, "u1"); r.Value() != "false" || r.Reason != eval.ReasonKilled {
		t.Fatalf("the kill switch is not in force: %+v", r)
	}

	pause.Release()
	if err := <-synced; err != nil {
		t.Fatal(err)
	}
	v, _ := a.engine.overrides.Current()
	if o, _ := v.Value.get("checkout"); !o.Killed || v.Revision != ch.revision {
		t.Fatalf("after the stale sync: revision %d (the kill switch is %d), override %+v", v.Revision, ch.revision, o)
	}
	for _, id := range []string{"u1", "u2", "u3"} {
		if r := checkoutFor(a, id); r.Reason != eval.ReasonKilled {
			t.Fatalf("%s: %+v: the kill switch flipped back", id, r)
		}
	}
	// b follows at its next sync.
	if err := b.syncOverrides(ctx); err != nil {
		t.Fatal(err)
	}
	if r := checkoutFor(b, "u1"); r.Reason != eval.ReasonKilled {
		t.Errorf("b after its sync: %+v", r)
	}
}

// Two instances changing different flags' overrides at once lose neither.
func TestConcurrentOverridesOnTwoInstancesBothStay(t *testing.T) {
	st := storedoctest.NewMemory()
	a := newTestAppOn(t, st, []byte(overridesTestDefs), 0)
	b := newTestAppOn(t, st, []byte(overridesTestDefs), 0)
	ctx := context.Background()
	done := make(chan error, 2)
	go func() {
		_, err := a.setOverride(ctx, "checkout", &eval.Override{Killed: true}, nil)
		done <- err
	}()
	go func() {
		_, err := b.setOverride(ctx, "hero", &eval.Override{Variant: "test"}, nil)
		done <- err
	}()
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	for _, app := range []*testApp{a, b} {
		if err := app.syncOverrides(ctx); err != nil {
			t.Fatal(err)
		}
		got := app.engine.snapshot().overrides
		if !got["checkout"].Killed || got["hero"].Variant != "test" {
			t.Errorf("overrides in force: %+v", got)
		}
	}
}

func TestOverrideChangesAreValidatedAndDeletesNeedAnOverride(t *testing.T) {
	a := newTestApp(t, []byte(overridesTestDefs), 0)
	ctx := context.Background()
	if _, err := a.setOverride(ctx, "nope", &eval.Override{Killed: true}, nil); !errors.Is(err, errUnknownFlag) {
		t.Errorf("unknown flag: %v", err)
	}
	if _, err := a.setOverride(ctx, "hero", &eval.Override{Variant: "c"}, nil); !errors.Is(err, errInvalidOverride) {
		t.Errorf("unknown variant: %v", err)
	}
	if _, err := a.setOverride(ctx, "hero", nil, nil); !errors.Is(err, errNoOverride) {
		t.Errorf("deleting nothing: %v", err)
	}
	writes := a.storage.StoresOf(a.docs.overrides.Key())
	first, err := a.setOverride(ctx, "hero", &eval.Override{Variant: "test"}, nil)
	if err != nil || first.revision == 0 {
		t.Fatal(first, err)
	}
	again, err := a.setOverride(ctx, "hero", &eval.Override{Variant: "test"}, nil)
	if err != nil || again.revision != 0 || a.storage.StoresOf(a.docs.overrides.Key()) != writes+1 {
		t.Errorf("setting the same override again wrote it again: %+v, %d writes", again, a.storage.StoresOf(a.docs.overrides.Key())-writes)
	}
	// A conditional delete (what lifting a rollback's kill does) leaves an
	// override that is not the one expected.
	killed := eval.Override{Killed: true}
	if ch, err := a.setOverride(ctx, "hero", nil, &killed); err != nil || ch.revision != 0 {
		t.Errorf("conditional delete of another override: %+v %v", ch, err)
	}
	if _, ok := a.engine.overrides.Value().get("hero"); !ok {
		t.Error("the operator's override was lifted")
	}
}

// The stored overrides document is the object releases before revisions
// wrote and read, with the envelope's fields beside it.
func TestStoredOverridesKeepTheirShape(t *testing.T) {
	a := newTestApp(t, []byte(overridesTestDefs), 0)
	if _, err := a.setOverride(context.Background(), "checkout", &eval.Override{Killed: true}, nil); err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(a.storage.Get(a.docs.overrides.Key()), &doc); err != nil {
		t.Fatal(err)
	}
	if doc["kind"] != "overrides" || doc["revision"] == nil || doc["updated_at"] == nil ||
		doc["overrides"].(map[string]any)["checkout"].(map[string]any)["killed"] != true {
		t.Errorf("stored overrides: %v", doc)
	}
	// A document from before revisions is read (revision 0).
	old := newTestApp(t, []byte(overridesTestDefs), 0)
	if err := old.storage.Store(context.Background(), old.docs.overrides.Key(),
		[]byte(`{"updated_at": "2026-11-01T00:00:00Z", "overrides": {"hero": {"variant": "control"}}}`)); err != nil {
		t.Fatal(err)
	}
	if err := old.syncOverrides(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := old.engine.snapshot().overrides["hero"].Variant; got != "control" {
		t.Errorf("override from an old document: %q", got)
	}
}

// The admin API changes overrides through the same path, and accepts exactly
// the methods its 405 lists.
func TestAdminOverrideEndpoint(t *testing.T) {
	a := newTestApp(t, []byte(overridesTestDefs), 0)
	do := func(method, body string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(method, "/feature_flags/overrides/checkout", strings.NewReader(body))
		r.RemoteAddr = "192.0.2.7:5555"
		w := httptest.NewRecorder()
		if err := a.serveOverride(w, r, "checkout"); err != nil {
			var apiErr caddy.APIError
			if !errors.As(err, &apiErr) {
				t.Fatalf("%s: %v is not an API error", method, err)
			}
			w.Code = apiErr.HTTPStatus
			w.Body.WriteString(apiErr.Error())
		}
		return w
	}
	if w := do(http.MethodPut, `{"killed": true}`); w.Code != http.StatusOK {
		t.Fatalf("PUT: %d %s", w.Code, w.Body)
	}
	if w := do(http.MethodGet, ""); w.Code != http.StatusOK || !strings.Contains(w.Body.String(), `"killed": true`) {
		t.Errorf("GET: %d %s", w.Code, w.Body)
	}
	if w := do(http.MethodPatch, `{}`); w.Code != http.StatusMethodNotAllowed || !strings.Contains(w.Body.String(), "GET, PUT or DELETE") {
		t.Errorf("PATCH: %d %s", w.Code, w.Body)
	}
	if w := do(http.MethodPost, `{"killed": true}`); w.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST, which the 405 does not list: %d %s", w.Code, w.Body)
	}
	if w := do(http.MethodDelete, ""); w.Code != http.StatusOK {
		t.Errorf("DELETE: %d %s", w.Code, w.Body)
	}
	if w := do(http.MethodDelete, ""); w.Code != http.StatusNotFound {
		t.Errorf("DELETE again: %d %s", w.Code, w.Body)
	}
}

// Row 11 of the hostile-input probe: stored overrides the definitions cannot
// take (a rollout_percentage outside 0..100, a variant the flag lacks, a
// flag not defined) stay out of force, are shown as invalid with why, and
// stay in storage; the good ones beside them are in force. When the
// definitions change they are checked again.
func TestStoredOverridesTheDefinitionsCannotTakeStayOutOfForce(t *testing.T) {
	ctx := context.Background()
	defs := `{"flags": [
		{"key": "checkout", "active": true, "filters": {"groups": [{"rollout_percentage": 100}]}},
		{"key": "banner", "active": true, "filters": {"groups": [{"rollout_percentage": 100}]}},
		{"key": "hero", "active": true, "filters": {"groups": [{}], "multivariate": {"variants": [
			{"key": "control", "rollout_percentage": 100}, {"key": "test", "rollout_percentage": 0}]}}}]}`
	a := newTestApp(t, []byte(defs), 0)
	stored := []byte(`{"format": 1, "kind": "overrides", "revision": 7, "updated_at": "2026-11-01T00:00:00Z", "overrides": {
		"checkout": {"rollout_percentage": 500},
		"hero": {"variant": "purple"},
		"ghost": {"killed": true},
		"banner": {"killed": true}}}`)
	if err := a.storage.Store(ctx, a.docs.overrides.Key(), stored); err != nil {
		t.Fatal(err)
	}
	if err := a.syncOverrides(ctx); err != nil {
		t.Fatal(err)
	}
	eval1 := func(flag string) eval.Result {
		return a.engine.definitions().Evaluate(flag, &eval.Subject{DistinctID: "u1"})
	}
	if r := eval1("banner"); r.Reason != eval.ReasonKilled {
		t.Errorf("banner's valid kill switch is not in force: %+v", r)
	}
	if r := eval1("checkout"); r.Value() != "true" || r.Reason == eval.ReasonKilled {
		t.Errorf("checkout with rollout_percentage 500 in storage: %+v, want its definition's answer", r)
	}
	if r := eval1("hero"); r.Value() != "control" {
		t.Errorf("hero with variant purple in storage: %+v, want its definition's answer", r)
	}

	st := a.status(a.clock.Now())
	for flag, want := range map[string]string{"checkout": "outside 0..100", "hero": `no variant "purple"`, "ghost": "not defined"} {
		if got := st.InvalidOverrides[flag]; !strings.Contains(got.Reason, want) {
			t.Errorf("invalid_overrides[%s] = %+v, want a reason with %q", flag, got, want)
		}
	}
	if _, ok := st.InvalidOverrides["banner"]; ok || len(st.InvalidOverrides) != 3 {
		t.Errorf("invalid_overrides: %+v", st.InvalidOverrides)
	}
	for _, f := range st.Flags {
		switch f.Key {
		case "checkout", "hero":
			if f.InvalidOverride == nil || f.Override != nil {
				t.Errorf("flag %s: override %+v, invalid %+v", f.Key, f.Override, f.InvalidOverride)
			}
		case "banner":
			if f.InvalidOverride != nil || f.Override == nil || !f.Override.Killed {
				t.Errorf("flag banner: override %+v, invalid %+v", f.Override, f.InvalidOverride)
			}
		}
	}
	if got := a.storage.Get(a.docs.overrides.Key()); !bytes.Equal(got, stored) {
		t.Errorf("the stored overrides were rewritten: %s", got)
	}

	// ghost is defined now: its kill switch comes into force.
	withGhost := strings.Replace(defs, `"flags": [`, `"flags": [{"key": "ghost", "active": true, "filters": {"groups": [{}]}},`, 1)
	if _, err := a.engine.install(definitionsSource{kind: sourceFile, location: "test"}, []byte(withGhost)); err != nil {
		t.Fatal(err)
	}
	if r := eval1("ghost"); r.Reason != eval.ReasonKilled {
		t.Errorf("ghost once defined: %+v, want its stored kill switch", r)
	}
	if st := a.status(a.clock.Now()); len(st.InvalidOverrides) != 2 {
		t.Errorf("invalid after ghost was defined: %+v", st.InvalidOverrides)
	}
}

// Row 12: an override body is exactly one JSON object of known fields, and at
// most 64 KiB (larger: 413, not read and cut).
func TestAdminOverrideBodiesAreOneBoundedJSONValue(t *testing.T) {
	a := newTestApp(t, []byte(overridesTestDefs), 0)
	huge := `{"variant": "` + strings.Repeat("a", 10<<20) + `"}`
	for _, c := range []struct {
		name    string
		body    string
		chunked bool
		status  int
		says    string
	}{
		{"trailing garbage", `{"killed":true} xyz`, false, http.StatusBadRequest, "exactly one JSON value"},
		{"two values", `{"killed":true}{"killed":false}`, false, http.StatusBadRequest, "exactly one JSON value"},
		{"two values on lines", "{\"killed\":true}\n{\"rollout_percentage\": 5}\n", false, http.StatusBadRequest, "exactly one JSON value"},
		{"unknown field", `{"killed":true, "kill": true}`, false, http.StatusBadRequest, "unknown field"},
		{"empty", ``, false, http.StatusBadRequest, "empty"},
		{"10 MB", huge, false, http.StatusRequestEntityTooLarge, "limit is 65536"},
		{"10 MB without a length", huge, true, http.StatusRequestEntityTooLarge, "limit of 65536"},
		{"just over 64 KiB", `{"killed": true}` + strings.Repeat(" ", 64<<10), false, http.StatusRequestEntityTooLarge, "65536"},
		{"one value and white space", "  {\"killed\": true}\n\n", false, http.StatusOK, `"killed": true`},
	} {
		t.Run(c.name, func(t *testing.T) {
			var body io.Reader = strings.NewReader(c.body)
			if c.chunked {
				body = io.MultiReader(body) // hides the length
			}
			r := httptest.NewRequest(http.MethodPut, "/feature_flags/overrides/checkout", body)
			w := httptest.NewRecorder()
			code, out := w.Code, ""
			if err := a.serveOverride(w, r, "checkout"); err != nil {
				var apiErr caddy.APIError
				if !errors.As(err, &apiErr) {
					t.Fatalf("%v is not an API error", err)
				}
				code, out = apiErr.HTTPStatus, apiErr.Message
			} else {
				out = w.Body.String()
			}
			if code != c.status || !strings.Contains(out, c.says) {
				t.Errorf("%d %s, want %d with %q", code, out, c.status, c.says)
			}
			if c.status != http.StatusOK {
				if _, set := a.engine.overrides.Value().get("checkout"); set {
					t.Errorf("a refused body set an override")
				}
			}
		})
	}
}

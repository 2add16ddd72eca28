package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flagsplit/flagsplit/eval"
	"github.com/flagsplit/flagsplit/posthog/posthogtest"
	"github.com/flagsplit/flagsplit/storedoc/storedoctest"
)

// manualPostHogSite polls the PostHog at host once at start and then only
// when asked (POST /feature_flags/refresh), so that every fetch is one the
// test made.
func manualPostHogSite(storageDir, host string, old, nu *upstream) string {
	return fmt.Sprintf(`{
	%s
	feature_flags {
		posthog {
			host %s
			project_api_key %s
			personal_api_key %s
			poll_interval 1h
		}
	}
}
:9080 {
	feature_flags
	%s
}`, globals(storageDir), host, testProjectKey, testPersonalKey, checkoutProxy(old, nu))
}

// storedDefinitionsFile is where the file system storage keeps the
// last-known-good copy of PostHog's answer.
func storedDefinitionsFile(storageDir string) string {
	return filepath.Join(storageDir, "feature_flags", testProjectKey, definitionsKey)
}

// A 200 from PostHog without a list of flags ({}, {"flags": null}, ...) or
// over a limit is an error: counted once, logged, never installed and never
// stored as last-known-good. The last good definitions keep serving, and the
// proxy stays ready. An explicit empty list is a project without flags.
func TestPostHogAnswerWithoutFlagsKeepsTheLastGoodDefinitions(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, checkoutDefs(100))
	t.Cleanup(ph.Close)
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := t.TempDir()
	load(t, manualPostHogSite(storage, ph.URL, old, nu))
	eventually(t, 5*time.Second, "the first definitions and their stored copy", func() bool {
		_, err := os.Stat(storedDefinitionsFile(storage))
		return err == nil && routesTo(t, siteA, 20) == "new"
	})
	stored, err := os.ReadFile(storedDefinitionsFile(storage))
	if err != nil {
		t.Fatal(err)
	}
	good := adminStatusOf(t, adminURL)

	deep := `{"flags": [], "cohorts": {"1": ` + strings.Repeat(`{"type":"AND","values":[`, eval.MaxDepth) + `{}` + strings.Repeat(`]}`, eval.MaxDepth) + `}}`
	for _, bad := range []struct{ name, body, want string }{
		{"an empty object", `{}`, `no "flags" list`},
		{"null flags", `{"flags": null}`, `"flags" is null, not a list`},
		{"flags as an object", `{"flags": {}}`, `"flags" is an object, not a list`},
		{"nested too deeply", deep, fmt.Sprintf("deeper than the limit of %d levels", eval.MaxDepth)},
	} {
		ph.SetDefinitions([]byte(bad.body))
		errs := metricValue(t, "caddy_feature_flags_definitions_errors_total")
		code, body := adminDo(t, http.MethodPost, adminURL+"/feature_flags/refresh", "")
		var answer struct {
			Error string `json:"error"`
		}
		if code != http.StatusBadGateway || json.Unmarshal([]byte(body), &answer) != nil || !strings.Contains(answer.Error, bad.want) {
			t.Errorf("%s: refresh answered %d %s, want 502 saying %q", bad.name, code, body, bad.want)
		}
		if got := metricValue(t, "caddy_feature_flags_definitions_errors_total") - errs; got != 1 {
			t.Errorf("%s: counted %v errors, want 1", bad.name, got)
		}
		if got := routesTo(t, siteA, 20); got != "new" {
			t.Errorf("%s: routes to %s; the last good definitions say new", bad.name, got)
		}
		st := adminStatusOf(t, adminURL)
		if !st.Ready || st.FlagCount != 3 || st.Source.Checksum != good.Source.Checksum || !strings.Contains(st.Source.Error, bad.want) {
			t.Errorf("%s: status ready %v, %d flags, checksum %s (was %s), last error %q",
				bad.name, st.Ready, st.FlagCount, st.Source.Checksum, good.Source.Checksum, st.Source.Error)
		}
		if now, err := os.ReadFile(storedDefinitionsFile(storage)); err != nil || !bytes.Equal(now, stored) {
			t.Errorf("%s: the stored last-known-good copy changed (%v):\n%s", bad.name, err, now)
		}
	}
	found := false
	for _, line := range logOf(t, storage) {
		if line["msg"] == "fetching flag definitions failed; the last good definitions keep serving" &&
			strings.Contains(fmt.Sprint(line["error"]), `"flags" is null`) {
			found = true
		}
	}
	if !found {
		t.Error("no log line for the answer with null flags")
	}

	// An explicit empty list: zero flags, every flag off, stored.
	ph.SetDefinitions([]byte(`{"flags": [], "group_type_mapping": {}, "cohorts": {}}`))
	if code, body := adminDo(t, http.MethodPost, adminURL+"/feature_flags/refresh", ""); code != http.StatusOK {
		t.Fatalf("refresh with an empty list: %d %s", code, body)
	}
	if got := routesTo(t, siteA, 20); got != "old" {
		t.Errorf("with no flags: routes to %s, want old", got)
	}
	if st := adminStatusOf(t, adminURL); !st.Ready || st.FlagCount != 0 || st.Source.Error != "" {
		t.Errorf("with no flags: %+v", st)
	}
	if now, _ := os.ReadFile(storedDefinitionsFile(storage)); !bytes.Contains(now, []byte(`"definitions":{"flags":[]`)) {
		t.Errorf("the empty list was not stored: %s", now)
	}
}

// When PostHog's first answer is unusable and there is no stored copy, the
// proxy is not ready: every flag serves false and requests go to default.
func TestPostHogFirstAnswerWithoutFlagsIsNotReady(t *testing.T) {
	ph := posthogtest.New(testProjectKey, testPersonalKey, []byte(`{"flags": null}`))
	t.Cleanup(ph.Close)
	old, nu := newUpstream(t, "old"), newUpstream(t, "new")
	storage := t.TempDir()
	// The app's metrics are exported while a config has the app: load one
	// (with a file of its own) to read the count before PostHog's answer.
	file := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, file, []byte(`{"flags": []}`))
	load(t, fmt.Sprintf("{\n%s\nfeature_flags {\ndefinitions %s\n}\n}\n:9080 {\nfeature_flags\nrespond ok\n}\n", globals(storage), file))
	errs := metricValue(t, "caddy_feature_flags_definitions_errors_total")
	load(t, manualPostHogSite(storage, ph.URL, old, nu))
	eventually(t, 5*time.Second, "the first answer to be refused", func() bool {
		return adminStatusOf(t, adminURL).Source.Error != ""
	})
	st := adminStatusOf(t, adminURL)
	if st.Ready || st.FlagCount != 0 || !strings.Contains(st.Source.Error, `"flags" is null`) {
		t.Errorf("status: ready %v, %d flags, last error %q", st.Ready, st.FlagCount, st.Source.Error)
	}
	if got := metricValue(t, "caddy_feature_flags_definitions_errors_total") - errs; got != 1 {
		t.Errorf("counted %v errors, want 1", got)
	}
	if got := routesTo(t, siteA, 20); got != "old" {
		t.Errorf("routes to %s, want the default, old", got)
	}
	if _, err := os.Stat(storedDefinitionsFile(storage)); !os.IsNotExist(err) {
		t.Errorf("an unusable answer was stored: %v", err)
	}
}

// A definitions file is held to the same rules: a file without a list of
// flags or over a limit is refused (the last good definitions keep serving,
// counted), and {"flags": []} is a legitimate empty set.
func TestDefinitionsFileWithoutFlagsIsRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "flags.json")
	writeFileAtomically(t, path, checkoutDefs(100))
	e := newEngine(100, newTestClock().Now)
	src := &fileSource{path: path, kind: sourceFile}
	if _, err := src.load(e); err != nil {
		t.Fatal(err)
	}
	checksum := e.snapshot().source.Checksum
	for _, bad := range []struct{ name, want string }{
		{`{}`, `no "flags"`},
		{`{"flags": null}`, `"flags" is null, not a list`},
		{`{"flags": {}}`, `"flags" is an object, not a list`},
		{`{"flags": [], "x": ` + strings.Repeat("[", eval.MaxDepth) + strings.Repeat("]", eval.MaxDepth) + `}`, "deeper than the limit"},
	} {
		writeFileAtomically(t, path, []byte(bad.name))
		_, err := src.load(e)
		snap := e.snapshot()
		if err == nil || !strings.Contains(err.Error(), bad.want) || !snap.ready || snap.source.Checksum != checksum ||
			e.definitions().Len() != 3 || !strings.Contains(snap.source.Error, bad.want) {
			t.Errorf("%s: err %v, ready %v, %d flags, last error %q", bad.name, err, snap.ready, e.definitions().Len(), snap.source.Error)
		}
	}
	// Over the size limit: refused from its size, before it is read.
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(eval.MaxDocumentSize + 1); err != nil {
		t.Fatal(err)
	}
	f.Close()
	var le *eval.LimitError
	if _, err := src.load(e); !errors.As(err, &le) || le.Limit != "size" || !strings.Contains(err.Error(), "limit of 33554432 bytes (32 MiB)") {
		t.Errorf("a file over the size limit: %v", err)
	}
	writeFileAtomically(t, path, []byte(`{"flags": []}`))
	if res, err := src.load(e); err != nil || !res.changed || e.definitions().Len() != 0 || e.snapshot().source.Error != "" {
		t.Errorf("an empty list of flags: %+v %v", res, err)
	}
}

// A stored last-known-good copy without a list of flags (as an older
// version could have written) is not served: with nothing else the proxy is
// not ready.
func TestStoredCopyWithoutFlagsIsNotServed(t *testing.T) {
	st := storedoctest.NewMemory()
	app := newTestAppOn(t, st, []byte(`{"flags": []}`), 100)
	app.PostHog = &PostHogConfig{Host: "http://posthog.invalid", ProjectAPIKey: testProjectKey}
	app.engine = newEngine(100, app.clock.Now)
	ctx := context.Background()
	if err := st.Store(ctx, app.storageKey(definitionsKey), []byte(`{"fetched_at": "2026-01-01T00:00:00Z", "host": "http://posthog.invalid", "definitions": {"flags": null}}`)); err != nil {
		t.Fatal(err)
	}
	app.serveStoredDefinitions(ctx)
	if snap := app.engine.snapshot(); snap.ready || !strings.Contains(snap.source.Error, `"flags" is null`) {
		t.Errorf("ready %v, last error %q", snap.ready, snap.source.Error)
	}
}

// GET /feature_flags/ shows a flag on a dependency cycle, and one depending
// on it, as never local, with the cycle's path.
func TestAdminStatusShowsDependencyCycles(t *testing.T) {
	dep := func(key, on string) string {
		return fmt.Sprintf(`{"key": %q, "active": true, "filters": {"groups": [{"properties": [
			{"key": %q, "type": "flag", "operator": "flag_evaluates_to", "value": true, "dependency_chain": [%q]}]}]}}`, key, on, on)
	}
	app := newTestApp(t, []byte(`{"flags": [`+dep("a", "b")+","+dep("b", "a")+","+dep("c", "a")+`]}`), 100)
	want := map[string]string{"a": "a -> b -> a", "b": "b -> a -> b", "c": `depends on flag "a"`}
	for _, f := range app.status(app.clock.Now()).Flags {
		if f.Local != "never" || len(f.LocalDetail) == 0 || !strings.Contains(f.LocalDetail[0], want[f.Key]) {
			t.Errorf("%s: local %q %q, want never saying %q", f.Key, f.Local, f.LocalDetail, want[f.Key])
		}
	}
}

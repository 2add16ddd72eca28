package caddymodule

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// TestProvisionChecks runs every testdata/caddyfile_provision/*.caddyfiletest
// file through `caddy validate`: a Caddyfile, optionally a line
// `---------- flags.json` and the definitions document it loads as {flags},
// then a line of dashes and what validation must say: `error: <text>` (the
// error must contain it) or `valid`, and `warn: <text>` lines (a warning
// logged while provisioning must contain each).
func TestProvisionChecks(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "caddyfile_provision", "*.caddyfiletest"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no provision tests: %v", err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			caddyfile, rest, ok := strings.Cut(string(data), "----------")
			if !ok {
				t.Fatal("no ---------- separator")
			}
			dir := t.TempDir()
			if defs, after, ok := strings.Cut(rest, "\n----------\n"); ok && strings.HasPrefix(defs, " flags.json\n") {
				if err := os.WriteFile(filepath.Join(dir, "flags.json"), []byte(strings.TrimPrefix(defs, " flags.json\n")), 0o600); err != nil {
					t.Fatal(err)
				}
				rest = after
			} else {
				rest = strings.TrimPrefix(rest, "\n")
			}
			caddyfile = strings.ReplaceAll(caddyfile, "{flags}", filepath.Join(dir, "flags.json"))
			cfg := adapt(t, caddyfile)
			logFile := filepath.Join(dir, "caddy.log")
			var doc map[string]any
			if err := json.Unmarshal(cfg, &doc); err != nil {
				t.Fatal(err)
			}
			doc["logging"] = map[string]any{"logs": map[string]any{"default": map[string]any{
				"writer": map[string]any{"output": "file", "filename": logFile}, "encoder": map[string]any{"format": "json"}}}}
			doc["storage"] = map[string]any{"module": "file_system", "root": dir}
			cfg, _ = json.Marshal(doc)
			var caddyCfg caddy.Config
			if err := json.Unmarshal(cfg, &caddyCfg); err != nil {
				t.Fatal(err)
			}
			validateErr := caddy.Validate(&caddyCfg)
			warnings := provisionWarnings(t, logFile)

			sc := bufio.NewScanner(strings.NewReader(rest))
			for sc.Scan() {
				line := strings.TrimSpace(sc.Text())
				switch {
				case line == "":
				case line == "valid":
					if validateErr != nil {
						t.Errorf("validation failed: %v", validateErr)
					}
				case strings.HasPrefix(line, "error: "):
					want := strings.TrimPrefix(line, "error: ")
					if validateErr == nil || !strings.Contains(validateErr.Error(), want) {
						t.Errorf("validation error = %v, want one containing %q", validateErr, want)
					}
				case strings.HasPrefix(line, "warn: "):
					want := strings.TrimPrefix(line, "warn: ")
					found := false
					for _, w := range warnings {
						found = found || strings.Contains(w, want)
					}
					if !found {
						t.Errorf("no warning contains %q; warnings:\n%s", want, strings.Join(warnings, "\n"))
					}
				default:
					t.Fatalf("unknown expectation %q", line)
				}
			}
		})
	}
}

// provisionWarnings returns the warnings in a JSON log file, each as its
// message and fields.
func provisionWarnings(t *testing.T, file string) []string {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, line := range bytes.Split(data, []byte("\n")) {
		var m map[string]any
		if json.Unmarshal(line, &m) != nil || m["level"] != "warn" {
			continue
		}
		text := fmt.Sprint(m["msg"])
		for _, k := range slices.Sorted(maps.Keys(m)) {
			if k != "msg" && k != "level" && k != "ts" && k != "logger" {
				text += fmt.Sprintf(" | %s=%v", k, m[k])
			}
		}
		out = append(out, text)
	}
	return out
}

package caddymodule

import (
	"fmt"
	"io"
	"math"
	"os"
	"sync"
	"time"

	"github.com/flagsplit/flagsplit/eval"
)

// fileSource is the definitions file: read at provision, then watched. Each
// version it reads is offered to the engine, which decides (one install
// path) whether it serves.
type fileSource struct {
	path string
	// kind is sourceFile, or sourceFallbackFile when PostHog is the source.
	kind sourceKind

	mu sync.Mutex
	// seen is what the file looked like when last read, so that an
	// unchanged file is not read again, and a broken version is reported
	// once rather than on every check.
	seen fileStamp
}

type fileStamp struct {
	size    int64
	modTime time.Time
	missing bool
}

// load reads the file and offers it to the engine.
func (f *fileSource) load(e *engine) (installResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.loadLocked(e)
}

// check reads the file when it changed since the last read, and offers it.
// changed is false when the file did not change.
func (f *fileSource) check(e *engine) (res installResult, changed bool, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	info, err := os.Stat(f.path)
	if err != nil {
		if f.seen.missing {
			return res, false, nil // reported already
		}
		f.seen = fileStamp{missing: true}
		msg := fmt.Errorf("flag definitions: %w", err)
		e.failed(msg.Error())
		return res, true, msg
	}
	if (fileStamp{size: info.Size(), modTime: info.ModTime()}) == f.seen {
		return res, false, nil
	}
	res, err = f.loadLocked(e)
	return res, true, err
}

func (f *fileSource) loadLocked(e *engine) (installResult, error) {
	info, err := os.Stat(f.path)
	if err != nil {
		e.failed(fmt.Sprintf("flag definitions: %v", err))
		return installResult{}, fmt.Errorf("flag definitions: %w", err)
	}
	// Remembered whatever the outcome: a broken version is reported once.
	f.seen = fileStamp{size: info.Size(), modTime: info.ModTime()}
	data, err := readDefinitionsFile(f.path)
	if err != nil {
		e.failed(fmt.Sprintf("%s: %v", f.path, err))
		return installResult{}, fmt.Errorf("%s: %w", f.path, err)
	}
	res, err := e.install(definitionsSource{kind: f.kind, location: f.path}, data)
	if err != nil {
		return res, fmt.Errorf("%s: %w", f.path, err)
	}
	return res, nil
}

// readDefinitionsFile reads a definitions file, refusing one over
// eval.MaxDocumentSize without reading it (a file that grows while it is
// read is cut at the limit, and refused too).
func readDefinitionsFile(path string) ([]byte, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("flag definitions: %w", err)
	}
	defer file.Close()
	if info, err := file.Stat(); err == nil && info.Size() > eval.MaxDocumentSize {
		return nil, &eval.LimitError{Limit: "size", Max: eval.MaxDocumentSize, Got: int(min(info.Size(), math.MaxInt32)), Offset: -1}
	}
	data, err := io.ReadAll(io.LimitReader(file, eval.MaxDocumentSize+1))
	if err != nil {
		return nil, fmt.Errorf("flag definitions: %w", err)
	}
	if len(data) > eval.MaxDocumentSize {
		return nil, &eval.LimitError{Limit: "size", Max: eval.MaxDocumentSize, Got: len(data), Offset: -1}
	}
	return data, nil
}

package eval

import (
	"fmt"
	"strings"
)

// Limits on a definitions document. A document over any of them is refused
// whole by Parse with a *LimitError, before anything is decoded, so a hostile
// or runaway answer costs one pass over its bytes, not the memory and time of
// compiling it.
const (
	// MaxDocumentSize bounds a definitions document in bytes. PostHog's
	// answer carries every flag of a project and the cohorts they use; a
	// project with thousands of flags stays in the single-digit megabytes,
	// so 32 MiB leaves a wide margin and still bounds what one parse may
	// allocate (several times the document).
	MaxDocumentSize = 32 << 20
	// MaxDepth bounds the nesting of JSON objects and arrays. A PostHog
	// document nests about ten deep (flags, filters, groups, properties,
	// values), a cohort a few more per nested property group; payloads
	// that are JSON values rather than strings add their own depth.
	MaxDepth = 64
	// MaxFlags bounds the number of flags in a document, far above any
	// PostHog project, because each compiled flag costs memory for as long
	// as the definitions serve.
	MaxFlags = 100_000
	// MaxDependencyDepth bounds how deeply flags depend on flags (a depends
	// on b, which depends on c, ...): evaluation follows such chains
	// recursively. A flag beyond it is malformed (a Problem) and evaluates
	// inconclusive, so no request pays for a longer chain.
	MaxDependencyDepth = 32
)

// LimitError is a document refused for being over one of the limits above.
type LimitError struct {
	// Limit names the limit: "size", "depth" or "flags".
	Limit string
	// Max is the limit's value, Got what the document has (for depth, the
	// depth at which scanning stopped; for size, at least Max+1, as a
	// reader may stop there).
	Max, Got int
	// Offset is the byte offset where the limit was crossed (-1 when the
	// whole document was measured).
	Offset int
}

func (e *LimitError) Error() string {
	switch e.Limit {
	case "size":
		return fmt.Sprintf("flag definitions: the document is larger than the limit of %d bytes (%d MiB)", e.Max, e.Max>>20)
	case "depth":
		return fmt.Sprintf("flag definitions: JSON nested deeper than the limit of %d levels (at byte %d)", e.Max, e.Offset)
	case "flags":
		return fmt.Sprintf("flag definitions: %d flags, over the limit of %d flags", e.Got, e.Max)
	}
	return fmt.Sprintf("flag definitions: over the %s limit of %d (got %d)", e.Limit, e.Max, e.Got)
}

// checkLimits checks the size and nesting depth of a document in one pass
// over its bytes. It does not validate JSON: brackets inside strings are
// skipped, and whatever else is wrong is left to the decoder.
func checkLimits(data []byte) error {
	if len(data) > MaxDocumentSize {
		return &LimitError{Limit: "size", Max: MaxDocumentSize, Got: len(data), Offset: -1}
	}
	depth := 0
	inString := false
	for i := 0; i < len(data); i++ {
		c := data[i]
		if inString {
			switch c {
			case '\\':
				i++
			case '"':
				inString = false
			}
			continue
		}
		switch c {
		case '"':
			inString = true
		case '{', '[':
			depth++
			if depth > MaxDepth {
				return &LimitError{Limit: "depth", Max: MaxDepth, Got: depth, Offset: i}
			}
		case '}', ']':
			depth--
		}
	}
	return nil
}

// flagsKind describes what the "flags" member is, for the error that refuses
// a document without a list of flags.
func flagsKind(raw []byte) string {
	s := strings.TrimSpace(string(raw))
	switch {
	case s == "null":
		return "null"
	case strings.HasPrefix(s, "{"):
		return "an object"
	case strings.HasPrefix(s, `"`):
		return "a string"
	case s == "true" || s == "false":
		return "a boolean"
	}
	return "a number"
}

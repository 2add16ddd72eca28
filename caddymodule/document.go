package caddymodule

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
)

// checkDocument checks that data is the document PostHog's definitions
// endpoint returns, before it is parsed: JSON at all (with the line and
// column of a syntax error), an object, and one with "flags". The mistakes
// this catches are the usual ones: a file cut short or hand-edited, and
// another PostHog document saved in its place (its REST API's list of flags,
// or one flag).
func checkDocument(data []byte) error {
	if len(bytes.TrimSpace(data)) == 0 {
		return errors.New("flag definitions: the document is empty")
	}
	var top any
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&top); err != nil {
		return syntaxError(data, err)
	}
	if dec.More() {
		line, col := position(data, int(dec.InputOffset()))
		return fmt.Errorf("flag definitions: line %d, column %d: more JSON after the document", line, col)
	}
	obj, ok := top.(map[string]any)
	if !ok {
		return fmt.Errorf("flag definitions: the document is a JSON %s; want an object with \"flags\" (the body of PostHog's /flags/definitions)", jsonKind(top))
	}
	if _, ok := obj["flags"]; ok {
		return nil
	}
	keys := make([]string, 0, len(obj))
	for k := range obj {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	found := "an empty object"
	if len(keys) > 0 {
		found = "an object with " + quoteList(keys)
	}
	hint := "the body of PostHog's /flags/definitions"
	switch {
	case obj["results"] != nil && obj["count"] != nil:
		hint = "this looks like PostHog's REST API list of flags (/api/projects/<id>/feature_flags/); " +
			"flagsplit needs the local-evaluation document of /flags/definitions?token=<project key>&send_cohorts"
	case obj["key"] != nil && obj["filters"] != nil:
		hint = "this looks like a single flag; put it in a list: {\"flags\": [ ... ]}"
	}
	return fmt.Errorf("flag definitions: the document has no \"flags\": found %s (%s)", found, hint)
}

// syntaxError describes a JSON decoding error by line and column.
func syntaxError(data []byte, err error) error {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		// Offset counts the bytes read, the offending one included.
		line, col := position(data, int(se.Offset)-1)
		return fmt.Errorf("flag definitions are not valid JSON: line %d, column %d: %s", line, col, se.Error())
	case errors.As(err, &te):
		line, col := position(data, int(te.Offset))
		return fmt.Errorf("flag definitions: line %d, column %d: %s", line, col, te.Error())
	case errors.Is(err, io.ErrUnexpectedEOF):
		line, col := position(data, len(data))
		return fmt.Errorf("flag definitions are not valid JSON: line %d, column %d: the document ends too soon", line, col)
	}
	return fmt.Errorf("flag definitions are not valid JSON: %w", err)
}

// position returns the 1-based line and column of a byte offset.
func position(data []byte, offset int) (line, col int) {
	offset = min(max(offset, 0), len(data))
	before := data[:offset]
	line = bytes.Count(before, []byte("\n")) + 1
	col = offset - (bytes.LastIndexByte(before, '\n') + 1) + 1
	return line, col
}

func jsonKind(v any) string {
	switch v.(type) {
	case []any:
		return "array"
	case string:
		return "string"
	case json.Number:
		return "number"
	case bool:
		return "boolean"
	case nil:
		return "null"
	}
	return "value"
}

func quoteList(keys []string) string {
	const most = 6
	q := make([]string, 0, most+1)
	for i, k := range keys {
		if i == most {
			q = append(q, fmt.Sprintf("and %d more", len(keys)-most))
			break
		}
		q = append(q, fmt.Sprintf("%q", k))
	}
	return strings.Join(q, ", ")
}

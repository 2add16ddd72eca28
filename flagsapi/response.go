package flagsapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"unicode/utf8"
)

// Flag is one flag's answer, as the flags API reports it.
type Flag struct {
	Key     string
	Enabled bool
	// Variant is the variant key of a multivariate flag's answer, "" for none.
	Variant string
	// Failed marks an answer PostHog's server could not compute; posthog-js
	// then keeps the value it had.
	Failed bool
	// Reason is the reason code (condition_match, no_condition_match,
	// out_of_rollout_bound, no_group_type, flag_disabled, ...).
	Reason string
	// ConditionIndex is the matching condition, -1 for none (null).
	ConditionIndex int
	// Description is the reason in words.
	Description string
	// ID and Version are PostHog's flag id and version.
	ID      int64
	Version int64
	// HasExperiment is PostHog's metadata.has_experiment, when the
	// definitions say (nil: not written).
	HasExperiment *bool
	// Payload is the payload of the answer as the definitions store it
	// (usually a JSON string holding JSON, which posthog-js parses), nil for
	// none. It must be valid JSON.
	Payload json.RawMessage
}

// appendValue writes the flag's value as JSON: the variant string, or the
// boolean.
func (f *Flag) appendValue(dst []byte, html bool) []byte {
	if f.Variant != "" {
		return appendString(dst, f.Variant, html)
	}
	return strconv.AppendBool(dst, f.Enabled)
}

// Response is a flags answer, written in any of the API's formats.
type Response struct {
	Flags []Flag
	// ErrorsWhileComputingFlags tells posthog-js some answers are not
	// PostHog's own: it then merges the answers into what it has instead of
	// replacing it.
	ErrorsWhileComputingFlags bool
	// QuotaLimited lists quota-limited resources (feature_flags), if any.
	QuotaLimited []string
	// RequestID identifies the answer; posthog-js reports it in
	// $feature_flag_called events.
	RequestID string
	// EvaluatedAt is when the flags were evaluated, in Unix milliseconds.
	EvaluatedAt int64
}

// Format is a response shape of the flags API.
type Format uint8

// Formats, chosen from the endpoint and its v parameter as PostHog's server
// does.
const (
	// FormatFlagsV2: {"flags": {key: {key, enabled, variant, reason,
	// metadata}}, errorsWhileComputingFlags, requestId, evaluatedAt}: /flags
	// with v>=2 and /decide with v>=4. Current posthog-js asks for it.
	FormatFlagsV2 Format = iota
	// FormatLegacy: {featureFlags: {key: value}, featureFlagPayloads: {key:
	// payload}, errorsWhileComputingFlags}: /flags without v (or v=1) and
	// /decide?v=3.
	FormatLegacy
	// FormatDecideV2: {featureFlags: {key: value}} with the enabled flags
	// only: /decide?v=2.
	FormatDecideV2
	// FormatDecideV1: {featureFlags: [key...]} with the enabled flags only:
	// /decide without v (or v=1).
	FormatDecideV1
)

var formatNames = [...]string{"flags_v2", "legacy", "decide_v2", "decide_v1"}

// String names the format.
func (f Format) String() string {
	if int(f) < len(formatNames) {
		return formatNames[f]
	}
	return "format(" + strconv.Itoa(int(f)) + ")"
}

// FormatFor picks the response format for a request to /decide (decide true)
// or /flags with the given v parameter, as PostHog's server does: an
// unparsable v counts as none.
func FormatFor(decide bool, v string) Format {
	n, err := strconv.Atoi(v)
	if err != nil {
		n = 0
	}
	if decide {
		switch {
		case n >= 4:
			return FormatFlagsV2
		case n == 3:
			return FormatLegacy
		case n == 2:
			return FormatDecideV2
		}
		return FormatDecideV1
	}
	if n >= 2 {
		return FormatFlagsV2
	}
	return FormatLegacy
}

// Append writes the response in format f to dst.
func (r *Response) Append(dst []byte, f Format) []byte {
	switch f {
	case FormatFlagsV2:
		dst = append(dst, `{"flags":{`...)
		for i := range r.Flags {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = r.Flags[i].appendDetail(dst)
		}
		dst = append(dst, '}')
	case FormatLegacy, FormatDecideV2:
		dst = append(dst, `{"featureFlags":{`...)
		n := 0
		for i := range r.Flags {
			fl := &r.Flags[i]
			if f == FormatDecideV2 && !fl.Enabled {
				continue
			}
			if n > 0 {
				dst = append(dst, ',')
			}
			n++
			dst = appendString(dst, fl.Key, false)
			dst = append(dst, ':')
			dst = fl.appendValue(dst, false)
		}
		dst = append(dst, '}')
		if f == FormatLegacy {
			dst = append(dst, `,"featureFlagPayloads":{`...)
			dst = appendPayloads(dst, r.Flags, false)
			dst = append(dst, '}')
		}
	case FormatDecideV1:
		dst = append(dst, `{"featureFlags":[`...)
		n := 0
		for i := range r.Flags {
			if !r.Flags[i].Enabled {
				continue
			}
			if n > 0 {
				dst = append(dst, ',')
			}
			n++
			dst = appendString(dst, r.Flags[i].Key, false)
		}
		dst = append(dst, ']')
	}
	if f == FormatFlagsV2 || f == FormatLegacy {
		dst = append(dst, `,"errorsWhileComputingFlags":`...)
		dst = strconv.AppendBool(dst, r.ErrorsWhileComputingFlags)
	}
	if len(r.QuotaLimited) > 0 {
		dst = append(dst, `,"quotaLimited":[`...)
		for i, q := range r.QuotaLimited {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = appendString(dst, q, false)
		}
		dst = append(dst, ']')
	}
	if r.RequestID != "" {
		dst = append(dst, `,"requestId":`...)
		dst = appendString(dst, r.RequestID, false)
	}
	if r.EvaluatedAt != 0 {
		dst = append(dst, `,"evaluatedAt":`...)
		dst = strconv.AppendInt(dst, r.EvaluatedAt, 10)
	}
	return append(dst, '}')
}

// appendPayloads writes key:payload for the enabled flags with a payload,
// as PostHog's legacy shape and posthog-js's bootstrap carry them.
func appendPayloads(dst []byte, flags []Flag, html bool) []byte {
	n := 0
	for i := range flags {
		fl := &flags[i]
		if !fl.Enabled || fl.Payload == nil {
			continue
		}
		if n > 0 {
			dst = append(dst, ',')
		}
		n++
		dst = appendString(dst, fl.Key, html)
		dst = append(dst, ':')
		dst = appendRaw(dst, fl.Payload, html)
	}
	return dst
}

// appendDetail writes the flag as a /flags?v=2 entry: "key":{...}.
func (f *Flag) appendDetail(dst []byte) []byte {
	dst = appendString(dst, f.Key, false)
	dst = append(dst, `:{"key":`...)
	dst = appendString(dst, f.Key, false)
	dst = append(dst, `,"enabled":`...)
	dst = strconv.AppendBool(dst, f.Enabled)
	dst = append(dst, `,"variant":`...)
	if f.Variant != "" {
		dst = appendString(dst, f.Variant, false)
	} else {
		dst = append(dst, "null"...)
	}
	if f.Failed {
		dst = append(dst, `,"failed":true`...)
	}
	dst = append(dst, `,"reason":{"code":`...)
	dst = appendString(dst, f.Reason, false)
	dst = append(dst, `,"condition_index":`...)
	if f.ConditionIndex >= 0 {
		dst = strconv.AppendInt(dst, int64(f.ConditionIndex), 10)
	} else {
		dst = append(dst, "null"...)
	}
	if f.Description != "" {
		dst = append(dst, `,"description":`...)
		dst = appendString(dst, f.Description, false)
	}
	dst = append(dst, `},"metadata":{"id":`...)
	dst = strconv.AppendInt(dst, f.ID, 10)
	dst = append(dst, `,"version":`...)
	dst = strconv.AppendInt(dst, f.Version, 10)
	dst = append(dst, `,"description":null,"payload":`...)
	if f.Payload != nil {
		dst = appendRaw(dst, f.Payload, false)
	} else {
		dst = append(dst, "null"...)
	}
	if f.HasExperiment != nil {
		dst = append(dst, `,"has_experiment":`...)
		dst = strconv.AppendBool(dst, *f.HasExperiment)
	}
	return append(dst, "}}"...)
}

// Bootstrap is what posthog-js's bootstrap option takes.
type Bootstrap struct {
	DistinctID string
	// IsIdentifiedID says the id is an identified user's, not an anonymous
	// device's: posthog-js then treats the visitor as identified.
	IsIdentifiedID bool
	Flags          []Flag
}

// AppendHTMLSafe writes the bootstrap object as JSON that is also safe inside
// an HTML <script> element: <, >, & and U+2028/U+2029 are written as \u
// escapes, as encoding/json's HTML escaping does, so no value can close the
// script element or end a JavaScript line.
func (b *Bootstrap) AppendHTMLSafe(dst []byte) []byte {
	dst = append(dst, `{"distinctID":`...)
	dst = appendString(dst, b.DistinctID, true)
	dst = append(dst, `,"isIdentifiedID":`...)
	dst = strconv.AppendBool(dst, b.IsIdentifiedID)
	dst = append(dst, `,"featureFlags":{`...)
	for i := range b.Flags {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = appendString(dst, b.Flags[i].Key, true)
		dst = append(dst, ':')
		dst = b.Flags[i].appendValue(dst, true)
	}
	dst = append(dst, `},"featureFlagPayloads":{`...)
	dst = appendPayloads(dst, b.Flags, true)
	return append(dst, "}}"...)
}

// appendRaw writes a JSON document, compacted; with html, HTML-escaped. A
// payload that is not valid JSON is written as a JSON string.
func appendRaw(dst []byte, raw json.RawMessage, html bool) []byte {
	var buf bytes.Buffer
	if err := json.Compact(&buf, raw); err != nil {
		return appendString(dst, string(raw), html)
	}
	if !html {
		return append(dst, buf.Bytes()...)
	}
	var esc bytes.Buffer
	json.HTMLEscape(&esc, buf.Bytes())
	return append(dst, esc.Bytes()...)
}

const hexDigits = "0123456789abcdef"

// appendString writes s as a JSON string. Invalid UTF-8 becomes U+FFFD, as
// encoding/json writes it; with html, <, >, & and U+2028/U+2029 are escaped.
func appendString(dst []byte, s string, html bool) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && (!html || (c != '<' && c != '>' && c != '&')) {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if html && (r == '\u2028' || r == '\u2029') {
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// wireResponse is what PostHog's server answers, in the v2 or the legacy
// shape.
type wireResponse struct {
	Flags map[string]struct {
		Key     string `json:"key"`
		Enabled bool   `json:"enabled"`
		Variant string `json:"variant"`
		Failed  bool   `json:"failed"`
		Reason  *struct {
			Code           string `json:"code"`
			ConditionIndex *int   `json:"condition_index"`
			Description    string `json:"description"`
		} `json:"reason"`
		Metadata *struct {
			ID            int64           `json:"id"`
			Version       int64           `json:"version"`
			Payload       json.RawMessage `json:"payload"`
			HasExperiment *bool           `json:"has_experiment"`
		} `json:"metadata"`
	} `json:"flags"`
	FeatureFlags              json.RawMessage            `json:"featureFlags"`
	FeatureFlagPayloads       map[string]json.RawMessage `json:"featureFlagPayloads"`
	ErrorsWhileComputingFlags bool                       `json:"errorsWhileComputingFlags"`
	QuotaLimited              []string                   `json:"quotaLimited"`
}

// Parsed is PostHog's answer to a fill-in call.
type Parsed struct {
	// Flags are the answers by key.
	Flags map[string]Flag
	// Errors is PostHog's errorsWhileComputingFlags.
	Errors bool
	// QuotaLimited is PostHog's quotaLimited.
	QuotaLimited []string
}

// ParseResponse reads PostHog's answer, in the v2 shape or the legacy one.
func ParseResponse(body []byte) (Parsed, error) {
	var w wireResponse
	if err := json.Unmarshal(body, &w); err != nil {
		return Parsed{}, fmt.Errorf("flags response: %w", err)
	}
	p := Parsed{Flags: map[string]Flag{}, Errors: w.ErrorsWhileComputingFlags, QuotaLimited: w.QuotaLimited}
	if w.Flags != nil {
		for key, d := range w.Flags {
			f := Flag{Key: key, Enabled: d.Enabled, Variant: d.Variant, Failed: d.Failed, ConditionIndex: -1}
			if d.Reason != nil {
				f.Reason, f.Description = d.Reason.Code, d.Reason.Description
				if d.Reason.ConditionIndex != nil {
					f.ConditionIndex = *d.Reason.ConditionIndex
				}
			}
			if d.Metadata != nil {
				f.ID, f.Version, f.HasExperiment = d.Metadata.ID, d.Metadata.Version, d.Metadata.HasExperiment
				if len(d.Metadata.Payload) > 0 && string(d.Metadata.Payload) != "null" {
					f.Payload = d.Metadata.Payload
				}
			}
			p.Flags[key] = f
		}
		return p, nil
	}
	if len(w.FeatureFlags) == 0 || string(w.FeatureFlags) == "null" {
		return p, nil
	}
	var values map[string]json.RawMessage
	if err := json.Unmarshal(w.FeatureFlags, &values); err != nil {
		return Parsed{}, errors.New("flags response: featureFlags is not an object")
	}
	for key, raw := range values {
		f := Flag{Key: key, ConditionIndex: -1}
		var b bool
		var s string
		switch {
		case json.Unmarshal(raw, &b) == nil:
			f.Enabled = b
		case json.Unmarshal(raw, &s) == nil:
			f.Enabled, f.Variant = s != "", s
		default:
			return Parsed{}, fmt.Errorf("flags response: featureFlags.%s is neither a boolean nor a string", key)
		}
		if pl, ok := w.FeatureFlagPayloads[key]; ok && string(pl) != "null" {
			f.Payload = pl
		}
		p.Flags[key] = f
	}
	return p, nil
}

// Package flagsapi is the wire format of PostHog's flags API as posthog-js
// speaks it: decoding the request bodies it sends to /flags and /decide (plain
// JSON, the base64 "data=" form, gzip), and writing the responses it parses
// (the /flags?v=2 shape with per-flag details, and the legacy featureFlags /
// featureFlagPayloads shapes), plus the object posthog-js's bootstrap option
// takes. It has no Caddy types and no evaluation logic of its own.
package flagsapi

import (
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"sort"
	"strconv"
	"strings"

	"github.com/flagsplit/flagsplit/eval"
)

// MaxBodySize bounds a decoded request body. posthog-js's flags requests are
// a few kilobytes (ids, groups and the properties the page set for flags);
// anything far larger is not a flags request.
const MaxBodySize = 1 << 20

// Encoding is how a request body was encoded.
type Encoding uint8

// Encodings posthog-js (and older versions of it) send.
const (
	// EncodingJSON: a plain JSON body (posthog-js's default for flags).
	EncodingJSON Encoding = iota
	// EncodingBase64Form: "data=<base64 of the JSON>", form-encoded, with
	// compression=base64 (feature_flag_request_compression: 'base64', and
	// every /decide request of older versions).
	EncodingBase64Form
	// EncodingBase64: the base64 of the JSON as the whole body.
	EncodingBase64
	// EncodingGzip: gzip of the JSON (compression=gzip-js or gzip, or the
	// gzip magic bytes).
	EncodingGzip
)

var encodingNames = [...]string{"json", "base64_form", "base64", "gzip"}

// String names the encoding, as in metrics and test names.
func (e Encoding) String() string {
	if int(e) < len(encodingNames) {
		return encodingNames[e]
	}
	return "encoding(" + strconv.Itoa(int(e)) + ")"
}

// Request is a decoded flags request: who the flags are for.
type Request struct {
	// Token is the project token (token, or api_key in older bodies).
	Token string
	// DistinctID is the person the flags are for.
	DistinctID string
	// AnonDistinctID is the anonymous id the person had before identify;
	// PostHog's server uses it for experience continuity only.
	AnonDistinctID string
	// DeviceID buckets device-bucketed flags.
	DeviceID string
	// Groups are the groups the person acts in, sorted by type, each with
	// the properties the page set for it.
	Groups []eval.Group
	// PersonProperties are the person properties the page set for flags
	// (posthog-js adds $lib and $lib_version), sorted by key.
	PersonProperties eval.Properties
	// FlagKeys restricts evaluation to these flags (nil: every flag).
	FlagKeys []string
	// DisableFlags asks for no flags at all (posthog-js sets it when it
	// wants only the remote config).
	DisableFlags bool
	// JSON is the decoded JSON document, as a fill-in call forwards it.
	JSON []byte
}

// wireRequest is the JSON body posthog-js sends.
type wireRequest struct {
	Token            string                     `json:"token,omitempty"`
	APIKey           string                     `json:"api_key,omitempty"`
	DistinctID       json.RawMessage            `json:"distinct_id,omitempty"`
	AnonDistinctID   json.RawMessage            `json:"$anon_distinct_id,omitempty"`
	DeviceID         json.RawMessage            `json:"$device_id,omitempty"`
	Groups           map[string]json.RawMessage `json:"groups,omitempty"`
	PersonProperties map[string]any             `json:"person_properties,omitempty"`
	GroupProperties  map[string]map[string]any  `json:"group_properties,omitempty"`
	FlagKeys         []string                   `json:"flag_keys,omitempty"`
	DisableFlags     json.RawMessage            `json:"disable_flags,omitempty"`
}

// ErrBodyTooLarge is returned for a body over MaxBodySize.
var ErrBodyTooLarge = errors.New("flags request body too large")

// Decode decodes a flags request body. query is the request's query (its
// compression parameter says how the body is encoded), contentType its
// Content-Type. Like PostHog's server it also recognises a gzip body by its
// magic bytes and a form body by its data= field, whatever the parameters say.
func Decode(query url.Values, contentType string, body []byte) (Request, Encoding, error) {
	doc, enc, err := decodeBody(query.Get("compression"), contentType, body)
	if err != nil {
		return Request{}, enc, err
	}
	// One decoder for the whole body, numbers kept as their literals (as
	// eval.Value needs them): cheaper than decoding each property apart.
	var w wireRequest
	dec := json.NewDecoder(bytes.NewReader(doc))
	dec.UseNumber()
	if err := dec.Decode(&w); err != nil {
		return Request{}, enc, fmt.Errorf("flags request body (%s): %w", enc, err)
	}
	if dec.More() {
		return Request{}, enc, fmt.Errorf("flags request body (%s): data after the JSON object", enc)
	}
	req := Request{Token: w.Token, FlagKeys: w.FlagKeys, JSON: doc}
	if req.Token == "" {
		req.Token = w.APIKey
	}
	if req.DistinctID, err = idText(w.DistinctID); err != nil {
		return Request{}, enc, fmt.Errorf("distinct_id: %w", err)
	}
	if req.AnonDistinctID, err = idText(w.AnonDistinctID); err != nil {
		return Request{}, enc, fmt.Errorf("$anon_distinct_id: %w", err)
	}
	if req.DeviceID, err = idText(w.DeviceID); err != nil {
		return Request{}, enc, fmt.Errorf("$device_id: %w", err)
	}
	req.DisableFlags = truthy(w.DisableFlags)
	if len(w.PersonProperties) > 0 {
		if req.PersonProperties, err = properties(w.PersonProperties); err != nil {
			return Request{}, enc, fmt.Errorf("person_properties: %w", err)
		}
	}
	if len(w.Groups) > 0 {
		req.Groups = make([]eval.Group, 0, len(w.Groups))
		for typ, raw := range w.Groups {
			key, err := idText(raw)
			if err != nil {
				return Request{}, enc, fmt.Errorf("groups.%s: %w", typ, err)
			}
			if key == "" {
				continue
			}
			g := eval.Group{Type: typ, Key: key}
			if props := w.GroupProperties[typ]; len(props) > 0 {
				if g.Properties, err = properties(props); err != nil {
					return Request{}, enc, fmt.Errorf("group_properties.%s: %w", typ, err)
				}
			}
			req.Groups = append(req.Groups, g)
		}
		sort.Slice(req.Groups, func(i, j int) bool { return req.Groups[i].Type < req.Groups[j].Type })
	}
	return req, enc, nil
}

// properties converts decoded JSON properties, sorted by key.
func properties(m map[string]any) (eval.Properties, error) {
	p := make(eval.Properties, 0, len(m))
	for k, raw := range m {
		v, err := eval.FromJSON(raw)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", k, err)
		}
		p = append(p, eval.Property{Key: k, Value: v})
	}
	sort.Slice(p, func(i, j int) bool { return p[i].Key < p[j].Key })
	return p, nil
}

// decodeBody undoes the body's transport encoding and returns the JSON.
func decodeBody(compression, contentType string, body []byte) ([]byte, Encoding, error) {
	compression = strings.ToLower(compression)
	if compression == "gzip" || compression == "gzip-js" || bytes.HasPrefix(body, []byte{0x1f, 0x8b}) {
		doc, err := gunzip(body)
		if err != nil {
			return nil, EncodingGzip, fmt.Errorf("flags request body (gzip): %w", err)
		}
		return doc, EncodingGzip, nil
	}
	trimmed := bytes.TrimSpace(body)
	if isForm(contentType) || bytes.HasPrefix(trimmed, []byte("data=")) {
		form, err := url.ParseQuery(string(trimmed))
		if err != nil {
			return nil, EncodingBase64Form, fmt.Errorf("flags request body (form): %w", err)
		}
		data := form.Get("data")
		if data == "" {
			return nil, EncodingBase64Form, errors.New("flags request body (form): no data field")
		}
		if strings.HasPrefix(strings.TrimSpace(data), "{") {
			// Very old clients sent the JSON itself in the form field.
			return []byte(data), EncodingBase64Form, nil
		}
		doc, err := decodeBase64(data)
		if err != nil {
			return nil, EncodingBase64Form, fmt.Errorf("flags request body (form): %w", err)
		}
		return doc, EncodingBase64Form, nil
	}
	if compression == "base64" || (len(trimmed) > 0 && trimmed[0] != '{') {
		doc, err := decodeBase64(string(trimmed))
		if err != nil {
			return nil, EncodingBase64, fmt.Errorf("flags request body (base64): %w", err)
		}
		return doc, EncodingBase64, nil
	}
	return trimmed, EncodingJSON, nil
}

func isForm(contentType string) bool {
	mt, _, _ := strings.Cut(contentType, ";")
	return strings.EqualFold(strings.TrimSpace(mt), "application/x-www-form-urlencoded")
}

// decodeBase64 accepts the standard and URL alphabets, padded or not:
// posthog-js writes standard padded base64, and the form decoding may have
// turned an unescaped '+' into a space.
func decodeBase64(s string) ([]byte, error) {
	s = strings.TrimSpace(strings.ReplaceAll(s, " ", "+"))
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if doc, err := enc.DecodeString(s); err == nil {
			return doc, nil
		}
	}
	return nil, errors.New("not base64")
}

func gunzip(body []byte) ([]byte, error) {
	zr, err := gzip.NewReader(bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	defer zr.Close()
	doc, err := io.ReadAll(io.LimitReader(zr, MaxBodySize+1))
	if err != nil {
		return nil, err
	}
	if len(doc) > MaxBodySize {
		return nil, ErrBodyTooLarge
	}
	return doc, nil
}

// idText reads an id that may be a JSON string or number (some SDKs send
// numeric ids; PostHog treats them as their decimal text). null and absent
// are "".
func idText(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	switch raw[0] {
	case '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", err
		}
		return s, nil
	case '-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9':
		var n json.Number
		if err := json.Unmarshal(raw, &n); err != nil {
			return "", err
		}
		return n.String(), nil
	}
	return "", fmt.Errorf("want a string or a number, got %.20s", raw)
}

// truthy reads a flag that may be a JSON boolean or a string ("true").
func truthy(raw json.RawMessage) bool {
	switch strings.ToLower(strings.Trim(string(bytes.TrimSpace(raw)), `"`)) {
	case "true", "1":
		return true
	}
	return false
}

// WithFlagKeys returns the JSON document with flag_keys set to keys: the body
// of a fill-in call that asks PostHog only for the flags the edge could not
// decide.
func WithFlagKeys(doc []byte, keys []string) ([]byte, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(doc, &m); err != nil {
		return nil, fmt.Errorf("flags request body: %w", err)
	}
	k, err := json.Marshal(keys)
	if err != nil {
		return nil, err
	}
	m["flag_keys"] = k
	return json.Marshal(m)
}

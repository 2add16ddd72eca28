package proxy

import (
	"errors"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// The posthog-js cookie holds encodeURIComponent(JSON.stringify(state)), where
// state has distinct_id, $device_id and whatever else the page registered
// (session ids, super properties, sometimes persisted flags). Only the two ids
// are needed on every request, so instead of decoding the whole document with
// encoding/json this scans it once, skipping every other member, and allocates
// nothing beyond the decoded cookie and the ids when they carry escapes.

// PostHogState is what flagsplit reads from a posthog-js cookie.
type PostHogState struct {
	DistinctID string
	DeviceID   string
}

var errMalformedCookie = errors.New("malformed posthog-js cookie")

// ParsePostHogCookie decodes a posthog-js cookie value.
func ParsePostHogCookie(raw string) (PostHogState, error) {
	doc, ok := decodeURIComponent(raw)
	if !ok || !utf8.ValidString(doc) {
		return PostHogState{}, errMalformedCookie
	}
	sc := jsonScanner{s: doc}
	var st PostHogState
	if err := sc.object(func(key string, sc *jsonScanner) error {
		switch key {
		case "distinct_id":
			v, err := sc.idValue()
			st.DistinctID = v
			return err
		case "$device_id":
			v, err := sc.idValue()
			st.DeviceID = v
			return err
		}
		return sc.skipValue(0)
	}); err != nil {
		return PostHogState{}, err
	}
	sc.space()
	if sc.i != len(sc.s) {
		return PostHogState{}, errMalformedCookie
	}
	return st, nil
}

// EncodePostHogCookie writes the state posthog-js needs to adopt an identity:
// the same shape its own anonymous state has.
func EncodePostHogCookie(st PostHogState) string {
	var sb strings.Builder
	sb.WriteString(`{"distinct_id":`)
	sb.WriteString(strconv.Quote(st.DistinctID))
	sb.WriteString(`,"$device_id":`)
	sb.WriteString(strconv.Quote(st.DeviceID))
	sb.WriteString(`,"$user_state":"anonymous"}`)
	return encodeURIComponent(sb.String())
}

type jsonScanner struct {
	s string
	i int
}

// maxJSONDepth bounds nesting in skipped values.
const maxJSONDepth = 64

func (sc *jsonScanner) space() {
	for sc.i < len(sc.s) {
		switch sc.s[sc.i] {
		case ' ', '\t', '\n', '\r':
			sc.i++
		default:
			return
		}
	}
}

func (sc *jsonScanner) peek() byte {
	sc.space()
	if sc.i >= len(sc.s) {
		return 0
	}
	return sc.s[sc.i]
}

func (sc *jsonScanner) expect(c byte) error {
	if sc.peek() != c {
		return errMalformedCookie
	}
	sc.i++
	return nil
}

// object walks a JSON object, calling member for each key with the scanner
// positioned at the value; member must consume the value.
func (sc *jsonScanner) object(member func(key string, sc *jsonScanner) error) error {
	if err := sc.expect('{'); err != nil {
		return err
	}
	if sc.peek() == '}' {
		sc.i++
		return nil
	}
	for {
		if sc.peek() != '"' {
			return errMalformedCookie
		}
		key, err := sc.str()
		if err != nil {
			return err
		}
		if err := sc.expect(':'); err != nil {
			return err
		}
		if err := member(key, sc); err != nil {
			return err
		}
		switch sc.peek() {
		case ',':
			sc.i++
		case '}':
			sc.i++
			return nil
		default:
			return errMalformedCookie
		}
	}
}

// idValue reads an id: a string, or a number spelled as in the document. Other
// types (and null) are not ids.
func (sc *jsonScanner) idValue() (string, error) {
	switch c := sc.peek(); {
	case c == '"':
		return sc.str()
	case c == '-' || ('0' <= c && c <= '9'):
		start := sc.i
		if err := sc.number(); err != nil {
			return "", err
		}
		return sc.s[start:sc.i], nil
	}
	return "", sc.skipValue(0)
}

// str reads a JSON string at the cursor, unescaping only when it has to.
func (sc *jsonScanner) str() (string, error) {
	sc.i++ // opening quote
	start := sc.i
	for sc.i < len(sc.s) {
		c := sc.s[sc.i]
		switch {
		case c == '"':
			out := sc.s[start:sc.i]
			sc.i++
			return out, nil
		case c == '\\':
			return sc.strEscaped(start)
		case c < 0x20:
			return "", errMalformedCookie
		}
		sc.i++
	}
	return "", errMalformedCookie
}

func (sc *jsonScanner) strEscaped(start int) (string, error) {
	b := []byte(sc.s[start:sc.i])
	for sc.i < len(sc.s) {
		c := sc.s[sc.i]
		switch {
		case c == '"':
			sc.i++
			return string(b), nil
		case c < 0x20:
			return "", errMalformedCookie
		case c != '\\':
			b = append(b, c)
			sc.i++
			continue
		}
		if sc.i+1 >= len(sc.s) {
			return "", errMalformedCookie
		}
		esc := sc.s[sc.i+1]
		sc.i += 2
		switch esc {
		case '"', '\\', '/':
			b = append(b, esc)
		case 'b':
			b = append(b, '\b')
		case 'f':
			b = append(b, '\f')
		case 'n':
			b = append(b, '\n')
		case 'r':
			b = append(b, '\r')
		case 't':
			b = append(b, '\t')
		case 'u':
			r, ok := sc.hex4()
			if !ok {
				return "", errMalformedCookie
			}
			if utf16.IsSurrogate(r) {
				// A surrogate pair is two \u escapes; a lone half becomes U+FFFD,
				// as encoding/json does.
				r2 := utf8.RuneError
				if strings.HasPrefix(sc.s[sc.i:], `\u`) {
					save := sc.i
					sc.i += 2
					if next, ok := sc.hex4(); ok {
						if dec := utf16.DecodeRune(r, next); dec != utf8.RuneError {
							r2 = dec
						} else {
							sc.i = save
						}
					} else {
						return "", errMalformedCookie
					}
				}
				r = r2
			}
			b = utf8.AppendRune(b, r)
		default:
			return "", errMalformedCookie
		}
	}
	return "", errMalformedCookie
}

func (sc *jsonScanner) hex4() (rune, bool) {
	if sc.i+4 > len(sc.s) {
		return 0, false
	}
	var r rune
	for k := 0; k < 4; k++ {
		v, ok := unhex(sc.s[sc.i+k])
		if !ok {
			return 0, false
		}
		r = r<<4 | rune(v)
	}
	sc.i += 4
	return r, true
}

func (sc *jsonScanner) number() error {
	start := sc.i
	if sc.i < len(sc.s) && sc.s[sc.i] == '-' {
		sc.i++
	}
	digits := func() int {
		n := 0
		for sc.i < len(sc.s) && sc.s[sc.i] >= '0' && sc.s[sc.i] <= '9' {
			sc.i++
			n++
		}
		return n
	}
	intStart := sc.i
	if digits() == 0 || (sc.s[intStart] == '0' && sc.i-intStart > 1) {
		return errMalformedCookie
	}
	if sc.i < len(sc.s) && sc.s[sc.i] == '.' {
		sc.i++
		if digits() == 0 {
			return errMalformedCookie
		}
	}
	if sc.i < len(sc.s) && (sc.s[sc.i] == 'e' || sc.s[sc.i] == 'E') {
		sc.i++
		if sc.i < len(sc.s) && (sc.s[sc.i] == '+' || sc.s[sc.i] == '-') {
			sc.i++
		}
		if digits() == 0 {
			return errMalformedCookie
		}
	}
	if sc.i == start {
		return errMalformedCookie
	}
	return nil
}

func (sc *jsonScanner) skipValue(depth int) error {
	if depth > maxJSONDepth {
		return errMalformedCookie
	}
	switch c := sc.peek(); {
	case c == '"':
		_, err := sc.str()
		return err
	case c == '{':
		return sc.object(func(_ string, sc *jsonScanner) error { return sc.skipValue(depth + 1) })
	case c == '[':
		sc.i++
		if sc.peek() == ']' {
			sc.i++
			return nil
		}
		for {
			if err := sc.skipValue(depth + 1); err != nil {
				return err
			}
			switch sc.peek() {
			case ',':
				sc.i++
			case ']':
				sc.i++
				return nil
			default:
				return errMalformedCookie
			}
		}
	case c == '-' || ('0' <= c && c <= '9'):
		return sc.number()
	case c == 't':
		return sc.literal("true")
	case c == 'f':
		return sc.literal("false")
	case c == 'n':
		return sc.literal("null")
	}
	return errMalformedCookie
}

func (sc *jsonScanner) literal(word string) error {
	if !strings.HasPrefix(sc.s[sc.i:], word) {
		return errMalformedCookie
	}
	sc.i += len(word)
	return nil
}

package eval

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
)

// Kind is the JSON type of a Value.
type Kind uint8

// The kinds a property value can have. They mirror JSON's types because PostHog's
// definitions and its flags service work on JSON values.
const (
	KindNull Kind = iota
	KindBool
	KindNumber
	KindString
	KindList
	KindObject
)

var kindNames = [...]string{"null", "bool", "number", "string", "list", "object"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// Value is one property value: what a caller knows about a person or group, or the
// value a filter compares against. Values from HTTP (headers, cookies) are strings;
// values decoded from JSON keep their JSON type, because PostHog's operators treat
// the number 1 and the string "1" alike in some places and differently in others.
//
// The zero Value is JSON null.
type Value struct {
	kind Kind
	b    bool
	num  float64
	// text is the value spelled the way PostHog's flags service stringifies it
	// (serde_json): strings as themselves, integers without a fraction, floats in
	// the shortest round-trip form, lists and objects as compact JSON with sorted
	// keys. Precomputed so the string operators never allocate.
	text string
	list []Value
}

// Null returns the JSON null value.
func Null() Value { return Value{} }

// String returns a string value.
func String(s string) Value { return Value{kind: KindString, text: s} }

// Bool returns a boolean value.
func Bool(b bool) Value {
	if b {
		return Value{kind: KindBool, b: true, text: "true"}
	}
	return Value{kind: KindBool, text: "false"}
}

// Int returns an integer number value.
func Int(i int64) Value {
	return Value{kind: KindNumber, num: float64(i), text: strconv.FormatInt(i, 10)}
}

// Float returns a floating-point number value. It is stringified as a float
// ("1.0", not "1"), as a JSON literal with a fraction or exponent would be.
func Float(f float64) Value {
	return Value{kind: KindNumber, num: f, text: formatFloat(f)}
}

// Kind reports the value's JSON type.
func (v Value) Kind() Kind { return v.kind }

// IsNull reports whether the value is JSON null.
func (v Value) IsNull() bool { return v.kind == KindNull }

// Text is the value as PostHog's flags service stringifies it for string operators.
func (v Value) Text() string {
	if v.kind == KindNull {
		return "null"
	}
	return v.text
}

// Number returns the numeric value and whether it is a finite number, either a JSON
// number or a string that spells one.
func (v Value) Number() (float64, bool) {
	switch v.kind {
	case KindNumber:
		return v.num, !math.IsInf(v.num, 0) && !math.IsNaN(v.num)
	case KindString:
		return parseDecimal(v.text)
	}
	return 0, false
}

// List returns the elements of a list value.
func (v Value) List() []Value { return v.list }

// Equal reports whether two values are the same JSON value.
func (v Value) Equal(o Value) bool {
	return v.kind == o.kind && v.Text() == o.Text()
}

// MarshalJSON writes the value back as JSON.
func (v Value) MarshalJSON() ([]byte, error) {
	switch v.kind {
	case KindNull:
		return []byte("null"), nil
	case KindString:
		return json.Marshal(v.text)
	default:
		return []byte(v.text), nil
	}
}

// UnmarshalJSON decodes any JSON value, keeping integer and float literals apart.
func (v *Value) UnmarshalJSON(data []byte) error {
	parsed, err := ParseJSONValue(data)
	if err != nil {
		return err
	}
	*v = parsed
	return nil
}

// ParseJSONValue decodes one JSON value.
func ParseJSONValue(data []byte) (Value, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var raw any
	if err := dec.Decode(&raw); err != nil {
		return Value{}, fmt.Errorf("decode JSON value: %w", err)
	}
	if dec.More() {
		return Value{}, errors.New("decode JSON value: trailing data after the value")
	}
	return FromJSON(raw)
}

// FromJSON converts a value produced by encoding/json (with or without UseNumber)
// into a Value.
func FromJSON(raw any) (Value, error) {
	return fromJSON(raw, 0)
}

// maxValueDepth bounds nesting so a hostile document cannot exhaust the stack.
const maxValueDepth = 64

func fromJSON(raw any, depth int) (Value, error) {
	if depth > maxValueDepth {
		return Value{}, errors.New("value nested too deeply")
	}
	switch x := raw.(type) {
	case nil:
		return Null(), nil
	case bool:
		return Bool(x), nil
	case string:
		return String(x), nil
	case json.Number:
		return numberFromLiteral(string(x))
	case float64:
		if x == math.Trunc(x) && math.Abs(x) < 1<<53 {
			return Int(int64(x)), nil
		}
		return Float(x), nil
	case int:
		return Int(int64(x)), nil
	case int64:
		return Int(x), nil
	case []any:
		list := make([]Value, len(x))
		for i, el := range x {
			ev, err := fromJSON(el, depth+1)
			if err != nil {
				return Value{}, err
			}
			list[i] = ev
		}
		return Value{kind: KindList, list: list, text: listText(list)}, nil
	case map[string]any:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var sb strings.Builder
		sb.WriteByte('{')
		for i, k := range keys {
			ev, err := fromJSON(x[k], depth+1)
			if err != nil {
				return Value{}, err
			}
			if i > 0 {
				sb.WriteByte(',')
			}
			writeJSONString(&sb, k)
			sb.WriteByte(':')
			writeNested(&sb, ev)
		}
		sb.WriteByte('}')
		return Value{kind: KindObject, text: sb.String()}, nil
	}
	return Value{}, fmt.Errorf("unsupported JSON value of type %T", raw)
}

// numberFromLiteral keeps serde_json's distinction: a literal without fraction or
// exponent that fits 64 bits is an integer, anything else is a float.
func numberFromLiteral(lit string) (Value, error) {
	if !strings.ContainsAny(lit, ".eE") {
		if i, err := strconv.ParseInt(lit, 10, 64); err == nil {
			return Int(i), nil
		}
		if u, err := strconv.ParseUint(lit, 10, 64); err == nil {
			return Value{kind: KindNumber, num: float64(u), text: strconv.FormatUint(u, 10)}, nil
		}
	}
	f, err := strconv.ParseFloat(lit, 64)
	if err != nil && !errors.Is(err, strconv.ErrRange) {
		return Value{}, fmt.Errorf("invalid number %q: %w", lit, err)
	}
	return Float(f), nil
}

func listText(list []Value) string {
	var sb strings.Builder
	sb.WriteByte('[')
	for i, el := range list {
		if i > 0 {
			sb.WriteByte(',')
		}
		writeNested(&sb, el)
	}
	sb.WriteByte(']')
	return sb.String()
}

func writeNested(sb *strings.Builder, v Value) {
	switch v.kind {
	case KindNull:
		sb.WriteString("null")
	case KindString:
		writeJSONString(sb, v.text)
	default:
		sb.WriteString(v.text)
	}
}

// writeJSONString quotes like serde_json: only the characters JSON requires are
// escaped (no HTML escaping, unlike encoding/json's default).
func writeJSONString(sb *strings.Builder, s string) {
	const hex = "0123456789abcdef"
	sb.WriteByte('"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch c {
		case '"':
			sb.WriteString(`\"`)
		case '\\':
			sb.WriteString(`\\`)
		case '\n':
			sb.WriteString(`\n`)
		case '\r':
			sb.WriteString(`\r`)
		case '\t':
			sb.WriteString(`\t`)
		case '\b':
			sb.WriteString(`\b`)
		case '\f':
			sb.WriteString(`\f`)
		default:
			if c < 0x20 {
				sb.WriteString(`\u00`)
				sb.WriteByte(hex[c>>4])
				sb.WriteByte(hex[c&0xF])
			} else {
				sb.WriteByte(c)
			}
		}
	}
	sb.WriteByte('"')
}

// formatFloat spells a float the way serde_json does (Rust's ryu crate): the
// shortest digits that round-trip, plain notation for decimal exponents in
// (-5, 16], scientific ("1e20", "1.5e-7") outside, and a ".0" on integral values.
func formatFloat(f float64) string {
	switch {
	case math.IsNaN(f):
		return "NaN"
	case math.IsInf(f, 1):
		return "inf"
	case math.IsInf(f, -1):
		return "-inf"
	case f == 0:
		if math.Signbit(f) {
			return "-0.0"
		}
		return "0.0"
	}
	// 'e' with precision -1 gives the shortest round-trip digits: d.ddddde±XX.
	sci := strconv.FormatFloat(f, 'e', -1, 64)
	neg := false
	if sci[0] == '-' {
		neg = true
		sci = sci[1:]
	}
	mant, expPart, _ := strings.Cut(sci, "e")
	exp, _ := strconv.Atoi(expPart)
	digits := strings.Replace(mant, ".", "", 1)
	n := len(digits)
	// kk is the position of the decimal point relative to the digit string.
	kk := exp + 1
	var out string
	switch {
	case 0 <= exp && kk <= 16 && n <= kk:
		out = digits + strings.Repeat("0", kk-n) + ".0"
	case 0 < kk && kk <= 16:
		out = digits[:kk] + "." + digits[kk:]
	case -5 < kk && kk <= 0:
		out = "0." + strings.Repeat("0", -kk) + digits
	case n == 1:
		out = digits + "e" + strconv.Itoa(kk-1)
	default:
		out = digits[:1] + "." + digits[1:] + "e" + strconv.Itoa(kk-1)
	}
	if neg {
		return "-" + out
	}
	return out
}

// parseDecimal reads a string as a finite decimal number, the way PostHog's flags
// service and posthog-node decide that a property "is numeric": optional sign,
// digits with an optional fraction, an optional exponent, surrounding ASCII white
// space ignored. Hex, "inf", "nan" and digit separators are not numbers.
func parseDecimal(s string) (float64, bool) {
	s = trimSpace(s)
	if n, ok := smallInteger(s); ok {
		return n, true
	}
	if s == "" || !isDecimalLiteral(s) {
		return 0, false
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsInf(f, 0) {
		return 0, false
	}
	return f, true
}

// smallInteger reads an unsigned integer of up to 15 digits exactly, the common
// case (counts, ids, ages) without strconv's general float parser.
func smallInteger(s string) (float64, bool) {
	if len(s) == 0 || len(s) > 15 {
		return 0, false
	}
	var n int64
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return float64(n), true
}

func isDecimalLiteral(s string) bool {
	i := 0
	if s[i] == '+' || s[i] == '-' {
		i++
	}
	digits := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
		digits++
	}
	if i < len(s) && s[i] == '.' {
		i++
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
			digits++
		}
	}
	if digits == 0 {
		return false
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		if i < len(s) && (s[i] == '+' || s[i] == '-') {
			i++
		}
		expDigits := 0
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
			expDigits++
		}
		if expDigits == 0 {
			return false
		}
	}
	return i == len(s)
}

// truthy is the flags service's boolean reading of a value: true, or a string equal
// to "true" in any case, or a list of only such values.
func (v Value) truthy() bool {
	switch v.kind {
	case KindBool:
		return v.b
	case KindString:
		return asciiEqualFold(v.text, "true")
	case KindList:
		for _, el := range v.list {
			if !el.truthy() {
				return false
			}
		}
		return true
	}
	return false
}

// boolLike reports whether a filter value switches the exact operator to comparing
// truthiness: a boolean, the string "true"/"false" in any case, or a list of those.
func (v Value) boolLike() bool {
	switch v.kind {
	case KindBool:
		return true
	case KindString:
		return asciiEqualFold(v.text, "true") || asciiEqualFold(v.text, "false")
	case KindList:
		for _, el := range v.list {
			if !el.boolLike() {
				return false
			}
		}
		return true
	}
	return false
}

// pythonTruthy is python's bool() of the value as json.loads would build it:
// null, false, zero, "" and empty lists and objects are false.
func (v Value) pythonTruthy() bool {
	switch v.kind {
	case KindBool:
		return v.b
	case KindNumber:
		return v.num != 0
	case KindString:
		return v.text != ""
	case KindList:
		return len(v.list) > 0
	case KindObject:
		return v.text != "{}"
	}
	return false
}

package proxy

import (
	"strings"
	"unsafe"
)

// The dictionary header form sends every flag in one X-Feature-Flags
// header, an RFC 8941 structured-field dictionary:
//
//	X-Feature-Flags: new-checkout-flow, homepage-hero="variant-b", beta=?0
//
// true is a bare key (a boolean true, ?1, implied), false is ?0, a variant
// is an sf-string, or, when it holds anything other than printable ASCII,
// an RFC 9651 display string (%"caf%c3%a9", percent-encoded UTF-8).
//
// Dictionary keys allow only lower-case letters, digits, "_", "-", "." and
// "*", and must start with a lower-case letter or "*", so flag keys are
// mapped (DictionaryKey): lower-case letters, digits, "-", "_" and "." are
// kept, except that the first character must be a lower-case letter; every
// other byte (upper-case letters, "*", spaces, the bytes of non-ASCII
// characters, a leading digit, "-", "_" or ".") becomes "*" and its two
// lower-case hex digits. "*" only ever starts an escape, so the mapping is
// reversible (DecodeDictionaryKey) and two flag keys never share a
// dictionary key: "Beta" is *42eta, "beta" is beta, "2fa" is *32fa,
// "sp ace" is sp*20ace.

// DictionaryKey maps a flag key to its dictionary key (see above).
func DictionaryKey(flag string) string {
	plain := true
	for i := 0; i < len(flag); i++ {
		if !keptInKey(flag[i], i == 0) {
			plain = false
			break
		}
	}
	if plain && flag != "" {
		return flag
	}
	const hex = "0123456789abcdef"
	var sb strings.Builder
	sb.Grow(len(flag) + 8)
	for i := 0; i < len(flag); i++ {
		c := flag[i]
		if keptInKey(c, i == 0) {
			sb.WriteByte(c)
			continue
		}
		sb.WriteByte('*')
		sb.WriteByte(hex[c>>4])
		sb.WriteByte(hex[c&15])
	}
	if flag == "" {
		// No flag has an empty key; "*" keeps the output a valid key.
		return "*"
	}
	return sb.String()
}

func keptInKey(c byte, first bool) bool {
	if 'a' <= c && c <= 'z' {
		return true
	}
	if first {
		return false
	}
	return ('0' <= c && c <= '9') || c == '-' || c == '_' || c == '.'
}

// DecodeDictionaryKey reverses DictionaryKey. ok is false for a key
// DictionaryKey cannot have produced.
func DecodeDictionaryKey(key string) (flag string, ok bool) {
	if strings.IndexByte(key, '*') < 0 {
		return key, key != ""
	}
	b := make([]byte, 0, len(key))
	for i := 0; i < len(key); i++ {
		c := key[i]
		if c != '*' {
			b = append(b, c)
			continue
		}
		if i+2 >= len(key) {
			return "", false
		}
		hi, ok1 := lowerHex(key[i+1])
		lo, ok2 := lowerHex(key[i+2])
		if !ok1 || !ok2 {
			return "", false
		}
		b = append(b, hi<<4|lo)
		i += 2
	}
	return string(b), true
}

func lowerHex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	}
	return 0, false
}

// DictionaryWriter writes the X-Feature-Flags dictionary of a flag
// selection, its keys mapped once.
type DictionaryWriter struct {
	keys []string
}

// NewDictionaryWriter prepares the dictionary of the flags keys, in order.
func NewDictionaryWriter(flags []string) DictionaryWriter {
	d := DictionaryWriter{keys: make([]string, len(flags))}
	for i, f := range flags {
		d.keys[i] = DictionaryKey(f)
	}
	return d
}

// Len is the length of the dictionary for these values.
func (d *DictionaryWriter) Len(values func(i int) string) int {
	n := 0
	for i, k := range d.keys {
		if i > 0 {
			n += 2 // ", "
		}
		n += len(k) + encodedValueLen(values(i))
	}
	return n
}

// String returns the dictionary for values(i), the value of flag i: true,
// false or a variant. It allocates once, the string itself.
func (d *DictionaryWriter) String(values func(i int) string) string {
	return d.stringIn(nil, values)
}

// stringIn is String written into buf when it fits. The caller must never
// write to buf again: the string shares its bytes.
func (d *DictionaryWriter) stringIn(buf []byte, values func(i int) string) string {
	n := d.Len(values)
	if n == 0 {
		return ""
	}
	if cap(buf) < n {
		buf = make([]byte, 0, n)
	}
	b := d.AppendTo(buf[:0], values)
	// b is never written again: the string may share its bytes (as
	// strings.Builder does).
	return unsafe.String(unsafe.SliceData(b), len(b))
}

// AppendTo appends the dictionary for values(i) to dst.
func (d *DictionaryWriter) AppendTo(dst []byte, values func(i int) string) []byte {
	for i, k := range d.keys {
		if i > 0 {
			dst = append(dst, ", "...)
		}
		dst = append(dst, k...)
		dst = appendValue(dst, values(i))
	}
	return dst
}

// valueKind is how a flag value is written.
type valueKind uint8

const (
	valueTrue valueKind = iota
	valueFalse
	valueString  // sf-string: printable ASCII
	valueDisplay // display string: anything else
)

func kindOf(v string) (valueKind, int) {
	switch v {
	case "true":
		return valueTrue, 0
	case "false":
		return valueFalse, len("=?0")
	}
	n := len(`=""`)
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case c < 0x20 || c > 0x7e:
			return valueDisplay, displayLen(v)
		case c == '"' || c == '\\':
			n += 2
		default:
			n++
		}
	}
	return valueString, n
}

func displayLen(v string) int {
	n := len(`=%""`)
	for i := 0; i < len(v); i++ {
		if displayEscaped(v[i]) {
			n += 3
		} else {
			n++
		}
	}
	return n
}

func displayEscaped(c byte) bool { return c < 0x20 || c > 0x7e || c == '%' || c == '"' }

func encodedValueLen(v string) int {
	_, n := kindOf(v)
	return n
}

func appendValue(dst []byte, v string) []byte {
	const hex = "0123456789abcdef"
	kind, _ := kindOf(v)
	switch kind {
	case valueTrue:
	case valueFalse:
		dst = append(dst, "=?0"...)
	case valueString:
		dst = append(dst, `="`...)
		start := 0
		for i := 0; i < len(v); i++ {
			if c := v[i]; c == '"' || c == '\\' {
				dst = append(dst, v[start:i]...)
				dst = append(dst, '\\')
				start = i // the quote or backslash itself follows
			}
		}
		dst = append(dst, v[start:]...)
		dst = append(dst, '"')
	case valueDisplay:
		dst = append(dst, `=%"`...)
		for i := 0; i < len(v); i++ {
			c := v[i]
			if displayEscaped(c) {
				dst = append(dst, '%', hex[c>>4], hex[c&15])
				continue
			}
			dst = append(dst, c)
		}
		dst = append(dst, '"')
	}
	return dst
}

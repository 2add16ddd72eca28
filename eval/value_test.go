package eval

import (
	"math"
	"testing"
)

func TestFormatFloatMatchesSerde(t *testing.T) {
	// Expected spellings are serde_json's (Rust ryu) for f64 values.
	cases := []struct {
		in   float64
		want string
	}{
		{1, "1.0"},
		{1.5, "1.5"},
		{-2.25, "-2.25"},
		{0.1, "0.1"},
		{100, "100.0"},
		{1e15, "1000000000000000.0"},
		{1e16, "1e16"},
		{1.5e16, "1.5e16"},
		{1e20, "1e20"},
		{0.0001, "0.0001"},
		{0.00001, "0.00001"},
		{1e-6, "1e-6"},
		{1.5e-7, "1.5e-7"},
		{123456.789, "123456.789"},
		{0, "0.0"},
		{math.Copysign(0, -1), "-0.0"},
	}
	for _, c := range cases {
		if got := formatFloat(c.in); got != c.want {
			t.Errorf("formatFloat(%v) = %q, want %q", c.in, got, c.want)
		}
	}
}

func TestParseJSONValueKeepsIntegerAndFloatApart(t *testing.T) {
	cases := []struct {
		json string
		kind Kind
		text string
	}{
		{`1`, KindNumber, "1"},
		{`1.0`, KindNumber, "1.0"},
		{`-17`, KindNumber, "-17"},
		{`2.5e3`, KindNumber, "2500.0"},
		{`18446744073709551615`, KindNumber, "18446744073709551615"},
		{`"x"`, KindString, "x"},
		{`true`, KindBool, "true"},
		{`null`, KindNull, "null"},
		{`[1, "a", null, true]`, KindList, `[1,"a",null,true]`},
		{`{"b": 1, "a": [2.0], "c": "<&>"}`, KindObject, `{"a":[2.0],"b":1,"c":"<&>"}`},
	}
	for _, c := range cases {
		v, err := ParseJSONValue([]byte(c.json))
		if err != nil {
			t.Fatalf("ParseJSONValue(%s): %v", c.json, err)
		}
		if v.Kind() != c.kind || v.Text() != c.text {
			t.Errorf("ParseJSONValue(%s) = %v %q, want %v %q", c.json, v.Kind(), v.Text(), c.kind, c.text)
		}
	}
	if _, err := ParseJSONValue([]byte(`1 2`)); err == nil {
		t.Error("trailing data accepted")
	}
	if _, err := ParseJSONValue([]byte(`{`)); err == nil {
		t.Error("truncated JSON accepted")
	}
}

func TestNumberReadsOnlyFiniteDecimals(t *testing.T) {
	numeric := map[string]float64{"1": 1, " 42 ": 42, "-3.5": -3.5, "+7": 7, "1e3": 1000, ".5": 0.5, "5.": 5}
	for s, want := range numeric {
		if got, ok := String(s).Number(); !ok || got != want {
			t.Errorf("String(%q).Number() = %v, %v; want %v", s, got, ok, want)
		}
	}
	for _, s := range []string{"", "abc", "1a", "0x10", "inf", "NaN", "1_000", "1e", "--1", ".", "1e999"} {
		if _, ok := String(s).Number(); ok {
			t.Errorf("String(%q) read as a number", s)
		}
	}
	if _, ok := Bool(true).Number(); ok {
		t.Error("a boolean read as a number")
	}
}

func TestLowerMatchesRustToLowercase(t *testing.T) {
	cases := map[string]string{
		"HELLO":  "hello",
		"Straße": "straße",
		"ΟΔΟΣ":   "οδος", // final sigma at the end of a word
		"ΣΑ":     "σα",   // not final
		"ΑΣ.":    "ας.",  // punctuation after the word
		"Σ":      "σ",    // no cased letter before: not final
		"İ":      "i\u0307",
		"ÀÉÎ":    "àéî",
	}
	for in, want := range cases {
		if got := lowerString(in); got != want {
			t.Errorf("lowerString(%q) = %q, want %q", in, got, want)
		}
		if !equalLower(in, want) {
			t.Errorf("equalLower(%q, %q) = false", in, want)
		}
	}
	if equalLower("STRASSE", "straße") {
		t.Error("STRASSE equals straße: that is case folding, not lower-casing")
	}
	if equalLower("İ", "i") {
		t.Error("İ lower-cases to i plus a combining dot, not to i")
	}
	if equalLower("ab\xff", "ab\xff") {
		t.Error("invalid UTF-8 matched")
	}
}

func TestASCIIFoldHelpers(t *testing.T) {
	if !containsASCIIFold("Hello WORLD", "o wor") || containsASCIIFold("ÄBC", "äbc") {
		t.Error("containsASCIIFold folds ASCII letters only")
	}
	if !hasPrefixASCIIFold("HTTPS://x", "https") || hasPrefixASCIIFold("ht", "https") {
		t.Error("hasPrefixASCIIFold")
	}
	if !hasSuffixASCIIFold("mail@EXAMPLE.com", "@example.com") || hasSuffixASCIIFold("com", "x.com") {
		t.Error("hasSuffixASCIIFold")
	}
	if !containsASCIIFold("anything", "") {
		t.Error("the empty string is contained in every string")
	}
}

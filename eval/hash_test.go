package eval

import (
	"crypto/sha1"
	"encoding/binary"
	"math/rand/v2"
	"strings"
	"testing"
)

// reference is the hash computed the plain way with crypto/sha1.
func reference(msg string) float64 {
	sum := sha1.Sum([]byte(msg))
	return float64(binary.BigEndian.Uint64(sum[:8])>>4) / hashScale
}

// TestHashMatchesCryptoSHA1 compares the single-block path with crypto/sha1 for
// every message length around the one-block limit and many random inputs.
func TestHashMatchesCryptoSHA1(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for n := 0; n <= 130; n++ {
		for k := 0; k < 50; k++ {
			b := make([]byte, n)
			for i := range b {
				b[i] = byte(rng.UintN(256))
			}
			msg := string(b)
			if got, want := HashRaw(msg), reference(msg); got != want {
				t.Fatalf("len %d: %v, crypto/sha1 gives %v (input %x)", n, got, want, b)
			}
			split := n / 2
			if got, want := Hash(msg[:split], msg[split:], "variant"), reference(msg[:split]+"."+msg[split:]+"variant"); got != want {
				t.Fatalf("Hash split at %d of %d: %v, want %v", split, n, got, want)
			}
		}
	}
	if got, want := Hash("flag", strings.Repeat("é", 40), ""), reference("flag."+strings.Repeat("é", 40)); got != want {
		t.Fatalf("multi-byte id: %v, want %v", got, want)
	}
}

func FuzzHashMatchesCryptoSHA1(f *testing.F) {
	for _, s := range []string{"", "a", strings.Repeat("x", 55), strings.Repeat("y", 56), "holdout-some_distinct_id"} {
		f.Add(s, "variant")
	}
	f.Fuzz(func(t *testing.T, id, salt string) {
		if got, want := Hash("key", id, salt), reference("key."+id+salt); got != want {
			t.Fatalf("Hash(key, %q, %q) = %v, crypto/sha1 gives %v", id, salt, got, want)
		}
	})
}

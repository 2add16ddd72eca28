//go:build !amd64 || purego

package eval

// hasFastSHA1 is false off amd64 (or with the purego tag): crypto/sha1 does
// all the hashing.
const hasFastSHA1 = false

func sha1ShortHash(block *[64]byte, n int) float64 {
	panic("eval: sha1ShortHash without the SHA extensions")
}

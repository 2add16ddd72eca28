//go:build amd64 && !purego

package eval

import "encoding/binary"

// The bucketing hash is SHA-1 of a short message (flag key, id, salt), which
// fits one 64-byte block. crypto/sha1.Sum spends about half its time around the
// block function (state setup, buffering, padding through a second Write); here
// the padded block is built in place and compressed with the SHA extensions in
// one call. Other CPUs and longer inputs use crypto/sha1.

//go:noescape
func sha1BlockSHANI(state *[5]uint32, block *[64]byte)

func cpuid(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32)

// hasFastSHA1 is fixed at start-up: the CPU has the SHA extensions and the
// SSSE3 and SSE4.1 instructions the block function also uses.
var hasFastSHA1 = detectSHANI()

func detectSHANI() bool {
	maxLeaf, _, _, _ := cpuid(0, 0)
	if maxLeaf < 7 {
		return false
	}
	_, _, ecx1, _ := cpuid(1, 0)
	_, ebx7, _, _ := cpuid(7, 0)
	const (
		ssse3 = 1 << 9  // leaf 1 ECX
		sse41 = 1 << 19 // leaf 1 ECX
		sha   = 1 << 29 // leaf 7 EBX
	)
	return ecx1&ssse3 != 0 && ecx1&sse41 != 0 && ebx7&sha != 0
}

// sha1ShortHash hashes the n message bytes at the start of block (n <= 55;
// the rest of block is zero) and converts the digest like hashBytes.
func sha1ShortHash(block *[64]byte, n int) float64 {
	block[n] = 0x80
	binary.BigEndian.PutUint64(block[56:], uint64(n)*8)
	state := [5]uint32{0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0}
	sha1BlockSHANI(&state, block)
	return float64((uint64(state[0])<<32|uint64(state[1]))>>4) / hashScale
}

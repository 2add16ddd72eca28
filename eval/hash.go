package eval

import (
	"crypto/sha1"
	"encoding/binary"
)

// hashScale is 2^60 - 1. The SDKs read the first 15 hex digits (60 bits) of a SHA-1
// digest as an integer and divide by it; dividing by 2^60 instead would move the
// bucket boundary and flip users who sit exactly on it.
const hashScale = float64(0xFFFFFFFFFFFFFFF)

// Salts PostHog appends to the hash input.
const (
	saltRollout = ""
	saltVariant = "variant"
)

// maxShortMessage is the longest message whose padding and length still fit one
// 64-byte SHA-1 block.
const maxShortMessage = 55

// Hash is PostHog's bucketing hash: SHA-1 of key + "." + id + salt, its top 60 bits
// divided by 2^60-1, giving a float64 in [0, 1]. The rollout gate uses an empty salt,
// variant selection the salt "variant".
func Hash(key, id, salt string) float64 {
	return hashParts(key, ".", id, salt)
}

// HashRaw applies the same digest-to-float conversion to an arbitrary input, as
// PostHog's flags service does for its holdout hash.
func HashRaw(input string) float64 {
	return hashParts(input, "", "", "")
}

// hashPrefixed hashes prefix + id + salt; flags keep "<key>." as their prefix.
func hashPrefixed(prefix, id, salt string) float64 {
	return hashParts(prefix, "", id, salt)
}

func hashParts(a, b, c, d string) float64 {
	n := len(a) + len(b) + len(c) + len(d)
	if hasFastSHA1 && n <= maxShortMessage {
		var block [64]byte
		i := copy(block[:], a)
		i += copy(block[i:], b)
		i += copy(block[i:], c)
		copy(block[i:], d)
		return sha1ShortHash(&block, n)
	}
	// A stack buffer keeps the common case free of allocations here too.
	var buf [192]byte
	msg := append(append(append(append(buf[:0], a...), b...), c...), d...)
	return hashBytes(msg)
}

func hashBytes(b []byte) float64 {
	sum := sha1.Sum(b)
	return float64(binary.BigEndian.Uint64(sum[:8])>>4) / hashScale
}

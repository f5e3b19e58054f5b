package envelope

import (
	"crypto/ed25519"
	"crypto/sha256"
	"sync"
)

// verifiedCap bounds the signatures remembered as good (two generations
// of verifiedCap/2; about 40 bytes each).
const verifiedCap = 16384

// verified remembers, for this process, (key, signature, message) triples
// whose ed25519 verification succeeded. An ed25519 verification is a pure
// function of those three, so a hit answers exactly what ed25519.Verify
// would. It saves the repeated verifications of one job's exact bytes when
// services share a process (writ dev runs coord, the supervisor and the
// runner in one: three verifications of every signature become one). Each
// verifier still decides which keys it trusts, at the moment it verifies;
// only the arithmetic is remembered. Failures are not remembered, so a
// stranger's garbage cannot fill it, and it is bounded: when the current
// generation is full it becomes the old one and the one before is dropped.
var verified = &sigCache{cap: verifiedCap}

type sigCache struct {
	cap      int // two generations of cap/2
	mu       sync.Mutex
	cur, old map[[sha256.Size]byte]struct{}
}

// cacheKey binds the key, the signature and the message's digest.
func cacheKey(pub ed25519.PublicKey, sig []byte, msgDigest *[sha256.Size]byte) [sha256.Size]byte {
	h := sha256.New()
	h.Write(pub)
	h.Write(sig)
	h.Write(msgDigest[:])
	var k [sha256.Size]byte
	h.Sum(k[:0])
	return k
}

// verify is ed25519.Verify(pub, msg, sig), answered from the cache when
// this process verified the same triple before. msgDigest is SHA-256(msg).
func (c *sigCache) verify(pub ed25519.PublicKey, msg []byte, msgDigest *[sha256.Size]byte, sig []byte) bool {
	if len(pub) != ed25519.PublicKeySize || len(sig) != ed25519.SignatureSize {
		return false
	}
	k := cacheKey(pub, sig, msgDigest)
	c.mu.Lock()
	_, hit := c.cur[k]
	if !hit {
		_, hit = c.old[k]
	}
	c.mu.Unlock()
	if hit {
		return true
	}
	if !ed25519.Verify(pub, msg, sig) {
		return false
	}
	c.mu.Lock()
	if c.cur == nil || len(c.cur) >= c.cap/2 {
		c.old, c.cur = c.cur, make(map[[sha256.Size]byte]struct{}, c.cap/2)
	}
	c.cur[k] = struct{}{}
	c.mu.Unlock()
	return true
}

// len is how many triples are remembered (for tests).
func (c *sigCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.cur) + len(c.old)
}

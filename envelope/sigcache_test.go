package envelope

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"testing"
)

// TestSigCache_AnswersAsVerify: a remembered success answers only for the
// exact key, signature and message; anything else is verified afresh.
func TestSigCache_AnswersAsVerify(t *testing.T) {
	c := &sigCache{cap: 64}
	pub, priv, _ := ed25519.GenerateKey(nil)
	other, _, _ := ed25519.GenerateKey(nil)
	msg := []byte("a job's PAE bytes")
	d := sha256.Sum256(msg)
	sig := ed25519.Sign(priv, msg)

	for pass := 0; pass < 2; pass++ {
		if !c.verify(pub, msg, &d, sig) {
			t.Fatalf("pass %d: good signature refused", pass)
		}
	}
	if c.len() != 1 {
		t.Fatalf("cache holds %d entries, want 1", c.len())
	}
	altered := []byte("a job's PAE byteZ")
	ad := sha256.Sum256(altered)
	bad := append([]byte(nil), sig...)
	bad[5] ^= 1
	cases := []struct {
		name string
		pub  ed25519.PublicKey
		msg  []byte
		d    *[sha256.Size]byte
		sig  []byte
	}{
		{"altered message", pub, altered, &ad, sig},
		{"another key", other, msg, &d, sig},
		{"altered signature", pub, msg, &d, bad},
		{"short signature", pub, msg, &d, sig[:10]},
		{"short key", pub[:10], msg, &d, sig},
	}
	for _, tc := range cases {
		for pass := 0; pass < 2; pass++ {
			if c.verify(tc.pub, tc.msg, tc.d, tc.sig) {
				t.Errorf("%s: accepted (pass %d)", tc.name, pass)
			}
		}
	}
	if c.len() != 1 {
		t.Errorf("failures were remembered: %d entries", c.len())
	}
}

// TestSigCache_Bounded: the cache never holds more than its capacity, and
// what falls out is verified again (and still accepted).
func TestSigCache_Bounded(t *testing.T) {
	c := &sigCache{cap: 16}
	pub, priv, _ := ed25519.GenerateKey(nil)
	type item struct {
		msg []byte
		d   [sha256.Size]byte
		sig []byte
	}
	var items []item
	for i := 0; i < 40; i++ {
		m := []byte(fmt.Sprintf("job %d", i))
		items = append(items, item{m, sha256.Sum256(m), ed25519.Sign(priv, m)})
	}
	for i := range items {
		if !c.verify(pub, items[i].msg, &items[i].d, items[i].sig) {
			t.Fatalf("item %d refused", i)
		}
		if n := c.len(); n > 16 {
			t.Fatalf("cache holds %d entries, cap 16", n)
		}
	}
	if !c.verify(pub, items[0].msg, &items[0].d, items[0].sig) {
		t.Fatal("an evicted signature was refused when verified again")
	}
}

// FuzzPlainString holds the fast path for plain strings to json.Unmarshal:
// whenever it answers, the answer is json.Unmarshal's.
func FuzzPlainString(f *testing.F) {
	for _, s := range []string{`"abc"`, `""`, `"a\"b"`, `"a\\u0041"`, `"\u00e9"`, "\"\x01\"", `"`, `abc`, `"ab/+="`, "\"\xff\""} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		got, ok := plainString(raw)
		if !ok {
			return
		}
		var want string
		if err := json.Unmarshal(raw, &want); err != nil {
			t.Fatalf("plainString(%q) = %q, json.Unmarshal refuses it: %v", raw, got, err)
		}
		if got != want {
			t.Fatalf("plainString(%q) = %q, json.Unmarshal says %q", raw, got, want)
		}
	})
}

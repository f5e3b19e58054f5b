package httpsig

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"
)

func readVector(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func vectorKey(t *testing.T) ed25519.PrivateKey {
	seed, err := hex.DecodeString(strings.TrimSpace(readVector(t, "test-key-ed25519.seed.hex")))
	if err != nil {
		t.Fatal(err)
	}
	return ed25519.NewKeyFromSeed(seed)
}

func readRequest(t *testing.T, name string) *http.Request {
	t.Helper()
	r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(readVector(t, name))))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestBase_RFC9421Vector rebuilds the RFC 9421 B.2.6 signature base and
// checks the signature byte for byte.
func TestBase_RFC9421Vector(t *testing.T) {
	r := readRequest(t, "signed-request.http")
	s, err := Parse(r, "sig-b26")
	if err != nil {
		t.Fatal(err)
	}
	base, err := Base(r, s.Components, s.Params, s.paramsOrder)
	if err != nil {
		t.Fatal(err)
	}
	want := readVector(t, "signature-base.txt")
	if string(base) != want {
		t.Errorf("Base =\n%s\nwant\n%s", base, want)
	}
	priv := vectorKey(t)
	if err := s.Verify(r, priv.Public().(ed25519.PublicKey)); err != nil {
		t.Errorf("Verify = %v", err)
	}
	sig := ed25519.Sign(priv, base)
	if !bytes.Equal(sig, s.Sig) {
		t.Error("signing the base does not reproduce the RFC's signature")
	}
	body, _ := io.ReadAll(r.Body)
	if err := CheckContentDigest(r.Header.Get("Content-Digest"), body); err != nil {
		t.Errorf("CheckContentDigest = %v", err)
	}
	// Tampering with a covered field breaks the signature.
	r.Header.Set("Content-Type", "text/plain")
	if err := s.Verify(r, priv.Public().(ed25519.PublicKey)); err == nil {
		t.Error("Verify accepted a request whose content-type changed")
	}
}

// aliceVerifier knows one key, k1, alice's, and its clock stands at now.
func aliceVerifier(pub ed25519.PublicKey, now time.Time) *Verifier {
	return &Verifier{
		Keys: func(_ context.Context, id string) (ed25519.PublicKey, string, error) {
			if id != "k1" {
				return nil, "", errors.New("unknown key")
			}
			return pub, "alice", nil
		},
		Now: func() time.Time { return now },
	}
}

func TestVerifier_Verify(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(nil)
	now := time.Unix(1_700_000_000, 0)
	v := aliceVerifier(pub, now)
	newReq := func(body string) *http.Request {
		r := httptest.NewRequest("POST", "http://ledger.test/v1/users?x=1", strings.NewReader(body))
		return r
	}
	signed := func(body string, at time.Time, key ed25519.PrivateKey, id string) *http.Request {
		r := newReq(body)
		if err := Sign(r, []byte(body), id, key, at); err != nil {
			t.Fatal(err)
		}
		r.Body = io.NopCloser(strings.NewReader(body))
		return r
	}
	_, otherPriv, _ := ed25519.GenerateKey(nil)
	replay := signed(`{"a":1}`, now, priv, "k1")
	replayCopy := replay.Clone(context.Background())
	replayCopy.Body = io.NopCloser(strings.NewReader(`{"a":1}`))

	for _, tc := range []struct {
		name string
		req  *http.Request
		want string // "" = accepted
	}{
		{"good", replay, ""},
		{"replayed", replayCopy, "replayed"},
		{"good no body", signed("", now, priv, "k1"), ""},
		{"unsigned", newReq(`{}`), "not signed"},
		{"unknown key", signed(`{}`, now, priv, "k2"), "unknown key"},
		{"wrong key", signed(`{}`, now, otherPriv, "k1"), "does not verify"},
		{"stale", signed(`{}`, now.Add(-10*time.Minute), priv, "k1"), "outside the accepted window"},
		{"body swapped", func() *http.Request {
			r := signed(`{"a":1}`, now, priv, "k1")
			r.Body = io.NopCloser(strings.NewReader(`{"a":2}`))
			return r
		}(), "content-digest does not match"},
		{"path changed", func() *http.Request {
			r := signed(`{}`, now, priv, "k1")
			r.URL.Path = "/v1/keys"
			return r
		}(), "does not verify"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, _, err := v.Verify(tc.req)
			if tc.want == "" {
				if err != nil || p != "alice" {
					t.Errorf("Verify = %q, %v; want alice, nil", p, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Verify = %v, want error containing %q", err, tc.want)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add(`sig1=("@method" "@path");created=1;keyid="k"`, `sig1=:AAAA:`)
	f.Add(`writ=("@method" "@authority" "@path" "@query" "content-digest");created=1700000000;keyid="SHA256:x";alg="ed25519";nonce="ab"`, `writ=:YWJj:`)
	f.Fuzz(func(t *testing.T, input, sig string) {
		r := httptest.NewRequest("GET", "http://x/", nil)
		r.Header.Set("Signature-Input", input)
		r.Header.Set("Signature", sig)
		s, err := Parse(r, "")
		if err != nil {
			return
		}
		_ = s.Verify(r, make(ed25519.PublicKey, ed25519.PublicKeySize))
	})
}

// readCounter is a request body that counts what was read of it.
type readCounter struct {
	r io.Reader
	n *int
}

func (c readCounter) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	*c.n += n
	return n, err
}

func (c readCounter) Close() error { return nil }

// TestVerifier_StrangerCostsLittle: what an unauthenticated request makes
// the verifier do is bounded before any body is read or hashed: an unknown
// key, a bad signature or a Content-Digest field made to be hashed
// thousands of times is refused with the body unread, and a digest that
// names an algorithm twice or runs long is refused even from a known key.
func TestVerifier_StrangerCostsLittle(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(nil)
	_, stranger, _ := ed25519.GenerateKey(nil)
	now := time.Unix(1_700_000_000, 0)
	v := aliceVerifier(pub, now)
	v.MaxBody = 4 << 20
	body := bytes.Repeat([]byte("x"), 1<<20)
	sum := ContentDigest(body)
	many := strings.TrimSuffix(strings.Repeat(sum+", ", 4000), ", ") // one member 4,000 times
	for _, tc := range []struct {
		name     string
		key      ed25519.PrivateKey
		id       string
		digest   string // replaces the Content-Digest field before signing; "" keeps Sign's
		want     string
		readable bool // may the body be read
	}{
		{"unknown key", stranger, "k2", "", "unknown key", false},
		{"bad signature", stranger, "k1", "", "does not verify", false},
		{"digest repeated 4,000 times", stranger, "k2", many, "longer than", false},
		{"a known key's digest naming sha-256 twice", priv, "k1", sum + ", " + sum, "more than once", false},
		{"a known key's good request", priv, "k1", "", "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			read := 0
			r := httptest.NewRequest("POST", "http://ledger.test/v1/users", bytes.NewReader(body))
			if err := signWithDigest(r, body, tc.id, tc.key, now, tc.digest); err != nil {
				t.Fatal(err)
			}
			r.Body = readCounter{r: bytes.NewReader(body), n: &read}
			_, err := v.Check(r)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("Check = %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("Check = %v, want it refused: %q", err, tc.want)
			case !tc.readable && read > 0:
				t.Errorf("the body was read (%d bytes) for a request refused as %q", read, tc.want)
			}
		})
	}
}

// signWithDigest is Sign, with the Content-Digest field digest (when set)
// covered instead of Sign's own.
func signWithDigest(r *http.Request, body []byte, keyID string, priv ed25519.PrivateKey, now time.Time, digest string) error {
	if err := Sign(r, body, keyID, priv, now); err != nil {
		return err
	}
	if digest == "" {
		return nil
	}
	// Sign set its own digest: sign the field as given instead.
	r.Header.Set("Content-Digest", digest)
	s, err := Parse(r, "")
	if err != nil {
		return err
	}
	base, err := Base(r, s.Components, s.Params, s.paramsOrder)
	if err != nil {
		return err
	}
	label := strings.SplitN(r.Header.Get("Signature-Input"), "=", 2)[0]
	r.Header.Set("Signature", label+"=:"+base64.StdEncoding.EncodeToString(ed25519.Sign(priv, base))+":")
	return nil
}

// BenchmarkVerifier_RefusedStranger: the CPU a stranger's request costs
// the verifier (coord's, the ledger's, the dispatcher's): a 1 MiB body
// whose Content-Digest names sha-256 4,000 times, signed by a key the
// server does not know. See BENCHMARKS.md.
func BenchmarkVerifier_RefusedStranger(b *testing.B) {
	_, stranger, _ := ed25519.GenerateKey(nil)
	now := time.Unix(1_700_000_000, 0)
	v := &Verifier{
		Keys: func(context.Context, string) (ed25519.PublicKey, string, error) {
			return nil, "", errors.New("unknown key")
		},
		Now:     func() time.Time { return now },
		MaxBody: 4 << 20,
	}
	body := bytes.Repeat([]byte("x"), 1<<20)
	many := strings.TrimSuffix(strings.Repeat(ContentDigest(body)+", ", 4000), ", ")
	r := httptest.NewRequest("POST", "http://ledger.test/v1/users", bytes.NewReader(body))
	if err := signWithDigest(r, body, "k2", stranger, now, many); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		r.Body = io.NopCloser(bytes.NewReader(body))
		if _, err := v.Check(r); err == nil {
			b.Fatal("a stranger's request was accepted")
		}
	}
}

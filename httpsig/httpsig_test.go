package httpsig

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
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

func TestVerifier_Verify(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(nil)
	now := time.Unix(1_700_000_000, 0)
	v := &Verifier{
		Keys: func(_ context.Context, id string) (ed25519.PublicKey, string, error) {
			if id != "k1" {
				return nil, "", errors.New("unknown key")
			}
			return pub, "alice", nil
		},
		Now: func() time.Time { return now },
	}
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

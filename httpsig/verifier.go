package httpsig

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
)

// DefaultMaxAge is how old (or how far in the future) a signature's created
// time may be.
const DefaultMaxAge = 5 * time.Minute

// DefaultMaxBody bounds the body a Verifier reads.
const DefaultMaxBody = 1 << 20

// Unavailable is a KeyFunc error that is its key source's outage (the
// ledger unreachable), not the key's fault: the request is answered 503,
// to be tried again, rather than 401.
type Unavailable struct{ Err error }

func (u Unavailable) Error() string { return u.Err.Error() }
func (u Unavailable) Unwrap() error { return u.Err }

// KeyFunc returns the public key and principal for a key ID, or an error
// when the key is unknown or not allowed.
type KeyFunc func(ctx context.Context, keyID string) (pub ed25519.PublicKey, principal string, err error)

// NonceStore keeps used nonces, so a replay is refused by every process
// sharing it (several ledgers on one database) and after a restart.
type NonceStore interface {
	// UseNonce records nonce until expires and reports whether it was
	// new (or its earlier use had expired).
	UseNonce(ctx context.Context, nonce string, now, expires time.Time) (bool, error)
}

// NoReplayGuard keeps no nonces: for an API whose every call is
// idempotent, where a replayed request does nothing a first one did not.
type NoReplayGuard struct{}

// UseNonce reports every nonce new.
func (NoReplayGuard) UseNonce(context.Context, string, time.Time, time.Time) (bool, error) {
	return true, nil
}

// Verifier checks signed requests: signature, coverage of method, authority,
// path, query and body digest, freshness, and nonce replay.
type Verifier struct {
	// Keys looks up signing keys. Required.
	Keys KeyFunc
	// Nonces keeps used nonces; nil keeps them in this process's memory
	// (a restart forgets them).
	Nonces NonceStore
	// Authorities, when set, are the names (host, or host:port) requests
	// must be addressed to: a request signed for another server is
	// refused here.
	Authorities []string
	// MaxAge bounds clock difference; zero means DefaultMaxAge.
	MaxAge time.Duration
	// MaxBody bounds the request body; zero means DefaultMaxBody.
	MaxBody int64
	// Now is the clock; nil means time.Now.
	Now func() time.Time

	mu        sync.Mutex
	nonces    map[string]time.Time // guarded by mu; nonce → expiry
	lastSweep time.Time            // guarded by mu
}

// Error is a verification failure; Status is the HTTP status to answer with.
type Error struct {
	Status int
	Msg    string
}

func (e *Error) Error() string { return e.Msg }

func (v *Verifier) now() time.Time {
	if v.Now != nil {
		return v.Now()
	}
	return time.Now()
}

// Verify checks r, records its nonce, and returns the signer's principal
// and key ID. The body is read (bounded) and put back for the handler.
func (v *Verifier) Verify(r *http.Request) (principal, keyID string, err error) {
	c, err := v.Check(r)
	if err != nil {
		return "", "", err
	}
	if err := v.Commit(r.Context(), c); err != nil {
		return "", "", err
	}
	return c.Principal, c.KeyID, nil
}

// Checked is a request whose signature verified; its nonce is not yet
// recorded (Commit).
type Checked struct {
	Principal, KeyID string
	nonce            string
	now, expires     time.Time
}

// Commit records c's nonce; a nonce used before is a replay. Call it once
// the request has passed every other check, so refused requests (a bad
// token) leave nothing behind.
func (v *Verifier) Commit(ctx context.Context, c *Checked) error {
	if v.Nonces != nil {
		ok, err := v.Nonces.UseNonce(ctx, c.nonce, c.now, c.expires)
		if err != nil {
			return &Error{Status: http.StatusServiceUnavailable, Msg: "record nonce: " + err.Error()}
		}
		if !ok {
			return &Error{Status: http.StatusUnauthorized, Msg: "request replayed (nonce already used)"}
		}
		return nil
	}
	if !v.useNonce(c.nonce, c.now, c.expires) {
		return &Error{Status: http.StatusUnauthorized, Msg: "request replayed (nonce already used)"}
	}
	return nil
}

// authority reports whether r is addressed to one of v's names.
func (v *Verifier) authority(r *http.Request) bool {
	if len(v.Authorities) == 0 {
		return true
	}
	host := strings.ToLower(r.Host)
	bare := host
	if h, _, err := net.SplitHostPort(host); err == nil {
		bare = h
	}
	bare = strings.Trim(bare, "[]")
	for _, a := range v.Authorities {
		a = strings.ToLower(a)
		if a == host || a == bare {
			return true
		}
	}
	return false
}

// Check verifies r's signature, coverage, body digest, freshness and
// authority, without recording its nonce.
//
// What a stranger can make it do is bounded by a small constant: the
// signature fields are parsed within their bounds (Parse), the key is
// found and the signature base (which covers the Content-Digest field's
// value) verified before the body is read at all; only a request whose
// signature verified has its body read (at most MaxBody) and hashed, once
// per digest algorithm (CheckContentDigest).
func (v *Verifier) Check(r *http.Request) (*Checked, error) {
	fail := func(status int, format string, a ...any) (*Checked, error) {
		return nil, &Error{Status: status, Msg: fmt.Sprintf(format, a...)}
	}
	maxBody := v.MaxBody
	if maxBody == 0 {
		maxBody = DefaultMaxBody
	}
	if r.ContentLength > maxBody {
		return fail(http.StatusRequestEntityTooLarge, "body is larger than %d bytes", maxBody)
	}
	s, err := Parse(r, "")
	if err != nil {
		return fail(http.StatusUnauthorized, "%v", err)
	}
	for _, c := range DefaultComponents {
		if !s.Covers(c) {
			return fail(http.StatusUnauthorized, "signature does not cover %s", c)
		}
	}
	// A body announced by its length must be covered; one of unknown
	// length (chunked) is checked once read, below.
	if r.ContentLength > 0 && !s.Covers("content-digest") {
		return fail(http.StatusUnauthorized, "signature does not cover content-digest")
	}
	if s.Params.Created.IsZero() {
		return fail(http.StatusUnauthorized, "signature has no created time")
	}
	maxAge := v.MaxAge
	if maxAge == 0 {
		maxAge = DefaultMaxAge
	}
	now := v.now()
	if d := now.Sub(s.Params.Created); d > maxAge || d < -maxAge {
		return fail(http.StatusUnauthorized, "signature created %s is outside the accepted window of ±%s (check the clock)", s.Params.Created.UTC().Format(time.RFC3339), maxAge)
	}
	if !s.Params.Expires.IsZero() && now.After(s.Params.Expires) {
		return fail(http.StatusUnauthorized, "signature expired at %s", s.Params.Expires.UTC().Format(time.RFC3339))
	}
	if s.Params.Nonce == "" {
		return fail(http.StatusUnauthorized, "signature has no nonce")
	}
	if !v.authority(r) {
		return fail(http.StatusUnauthorized, "request is addressed to %q, which is not this server (%s)", r.Host, strings.Join(v.Authorities, ", "))
	}
	// Bounded before the signature base is built from it, and the same
	// bound CheckContentDigest applies: one member per algorithm.
	if err := checkDigestField(r.Header.Values("Content-Digest")); err != nil {
		return fail(http.StatusUnauthorized, "%v", err)
	}
	pub, principal, err := v.Keys(r.Context(), s.Params.KeyID)
	if err != nil {
		if errors.As(err, new(Unavailable)) {
			return fail(http.StatusServiceUnavailable, "key %s: %v", s.Params.KeyID, err)
		}
		return fail(http.StatusUnauthorized, "key %s: %v", s.Params.KeyID, err)
	}
	if err := s.Verify(r, pub); err != nil {
		return fail(http.StatusUnauthorized, "%v", err)
	}
	// Only now, from a signer the server knows, is the body read and hashed.
	body, err := ReadBody(r, maxBody)
	if err != nil {
		return fail(http.StatusRequestEntityTooLarge, "%v", err)
	}
	if len(body) > 0 {
		if !s.Covers("content-digest") {
			return fail(http.StatusUnauthorized, "signature does not cover content-digest")
		}
		if err := CheckContentDigest(r.Header.Get("Content-Digest"), body); err != nil {
			return fail(http.StatusUnauthorized, "%v", err)
		}
	}
	// The nonce is recorded (Commit) only after the signature verifies,
	// so forged requests cannot fill the table.
	return &Checked{Principal: principal, KeyID: s.Params.KeyID, nonce: s.Params.KeyID + "/" + s.Params.Nonce, now: now, expires: now.Add(2 * maxAge)}, nil
}

// useNonce records nonce until expiry and reports whether it was new.
func (v *Verifier) useNonce(nonce string, now, expiry time.Time) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.nonces == nil {
		v.nonces = make(map[string]time.Time)
	}
	// Sweep expired nonces at most once a second: a sweep walks the whole
	// table, which holds every request of the last 2×MaxAge (hundreds of
	// thousands under a large fleet's uptime reports).
	if len(v.nonces) > 1024 && now.Sub(v.lastSweep) >= time.Second {
		v.lastSweep = now
		for n, exp := range v.nonces {
			if now.After(exp) {
				delete(v.nonces, n)
			}
		}
	}
	if exp, ok := v.nonces[nonce]; ok && !now.After(exp) {
		return false
	}
	v.nonces[nonce] = expiry
	return true
}

type principalKey struct{}

// Principal returns the verified principal stored by Middleware.
func Principal(ctx context.Context) string {
	p, _ := ctx.Value(principalKey{}).(string)
	return p
}

// Middleware rejects requests that do not verify and passes the signer's
// principal to the handler (see Principal).
func (v *Verifier) Middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		principal, _, err := v.Verify(r)
		if err != nil {
			status := http.StatusUnauthorized
			var he *Error
			if errors.As(err, &he) {
				status = he.Status
			}
			http.Error(w, "request signature: "+err.Error(), status)
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), principalKey{}, principal)))
	})
}

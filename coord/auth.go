package coord

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/httpsig"
	"github.com/writ-fleet/writ/internal/httpapi"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
)

// Bounds of the authentication layer.
const (
	// DefaultStreamsPerUser bounds one user's open event streams and
	// waiting requests (a pipeline waits on many jobs at once; each wait
	// is served from coord's memory, not a Redis read of its own).
	DefaultStreamsPerUser = 256
	// principalTTL is how long a resolved key stays cached: a revoked key
	// or a changed role takes effect within it.
	principalTTL = 10 * time.Second
	// unknownTTL is how long a key the ledger does not know stays refused
	// without asking again, so garbage key IDs cannot hammer the ledger.
	unknownTTL = 5 * time.Second
	// maxPrincipals bounds the cache.
	maxPrincipals = 10000
)

// principal is a request's verified signer.
type principal struct {
	user  string
	roles map[string]string // site (or "*") → role
}

// mayRead reports whether p may read rec: a user reads the jobs it
// signed; a site's viewers, deployers and admins read the site's jobs.
func (p *principal) mayRead(rec *job.Record) bool {
	if p.roles[ledger.AllSites] != "" || p.roles[rec.Site] != "" {
		return true
	}
	return slices.Contains(rec.Users, p.user)
}

// auth authenticates coord's callers: every request is RFC 9421-signed by
// a user's key known to the ledger (an active key of an enabled user).
type auth struct {
	ledger   *ledger.Client
	verifier *httpsig.Verifier
	now      func() time.Time

	group   singleflight.Group
	mu      sync.Mutex
	cache   map[string]principalEntry // guarded by mu; key ID → entry
	streams map[string]int            // guarded by mu; user → open streams
	limit   int
}

type principalEntry struct {
	pub ed25519.PublicKey
	p   *principal
	err error
	at  time.Time
}

func newAuth(lc *ledger.Client, now func() time.Time, streams int, authorities []string) *auth {
	if streams <= 0 {
		streams = DefaultStreamsPerUser
	}
	a := &auth{ledger: lc, now: now, cache: map[string]principalEntry{}, streams: map[string]int{}, limit: streams}
	// No replay guard: coord's API is idempotent (reads, and submissions
	// deduplicated by job ID), requests travel inside TLS, and the created
	// time bounds how long a signature is good. A guard would keep every
	// request's nonce for ten minutes: half a million entries at the
	// throughput coord serves, for nothing.
	a.verifier = &httpsig.Verifier{Keys: a.key, Now: now, MaxBody: envelope.MaxEnvelopeBytes, Nonces: httpsig.NoReplayGuard{}, Authorities: authorities}
	return a
}

type principalKey struct{}

// principalOf returns the request's principal (set by middleware).
func principalOf(ctx context.Context) *principal {
	p, _ := ctx.Value(principalKey{}).(*principal)
	return p
}

// middleware refuses unsigned or badly signed requests with 401.
func (a *auth) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, keyID, err := a.verifier.Verify(r)
		if err != nil {
			status := http.StatusUnauthorized
			var he *httpsig.Error
			if errors.As(err, &he) {
				status = he.Status
			}
			if status == http.StatusServiceUnavailable {
				httpapi.JSON(w, status, httpapi.ErrorBody{Error: "request signature: " + err.Error(), Reason: "ledger_unreachable"})
				return
			}
			httpapi.JSON(w, status, httpapi.ErrorBody{Error: "request signature: " + err.Error() + " (coord answers requests signed by a user's key: writ signs with --key / $WRIT_KEY)", Reason: "unauthenticated"})
			return
		}
		e := a.entry(r.Context(), keyID)
		if errors.As(e.err, new(httpsig.Unavailable)) {
			httpapi.JSON(w, http.StatusServiceUnavailable, httpapi.ErrorBody{Error: "request signature: key " + keyID + ": " + e.err.Error(), Reason: "ledger_unreachable"})
			return
		}
		if e.err != nil {
			httpapi.JSON(w, http.StatusUnauthorized, httpapi.ErrorBody{Error: "request signature: key " + keyID + ": " + e.err.Error(), Reason: "unauthenticated"})
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), principalKey{}, e.p)))
	})
}

// key resolves a signing key for the verifier.
func (a *auth) key(ctx context.Context, keyID string) (ed25519.PublicKey, string, error) {
	e := a.entry(ctx, keyID)
	if e.err != nil {
		return nil, "", e.err
	}
	return e.pub, e.p.user, nil
}

// entry returns what the cache (or the ledger) knows of keyID.
func (a *auth) entry(ctx context.Context, keyID string) principalEntry {
	if keyID == "" || len(keyID) > 128 {
		return principalEntry{err: errors.New("no usable keyid")}
	}
	now := a.now()
	a.mu.Lock()
	e, ok := a.cache[keyID]
	a.mu.Unlock()
	fresh := ok && ((e.err == nil && now.Sub(e.at) < principalTTL) || (e.err != nil && now.Sub(e.at) < unknownTTL))
	if !fresh {
		last := e
		v, _, _ := a.group.Do(keyID, func() (any, error) {
			e := a.resolve(ctx, keyID)
			if errors.As(e.err, new(httpsig.Unavailable)) && ok && last.err == nil && now.Sub(last.at) < principalTTL+ledger.DefaultStaleGrace {
				// The ledger is away: the last answer serves a while
				// longer, as verifiers' trust snapshots do.
				return last, nil
			}
			a.mu.Lock()
			if len(a.cache) >= maxPrincipals {
				for k := range a.cache { // evict one at random
					delete(a.cache, k)
					break
				}
			}
			a.cache[keyID] = e
			a.mu.Unlock()
			return e, nil
		})
		e = v.(principalEntry)
	}
	return e
}

// resolve asks the ledger who holds keyID.
func (a *auth) resolve(ctx context.Context, keyID string) principalEntry {
	e := principalEntry{at: a.now()}
	k, err := a.ledger.KeyByID(ctx, keyID)
	if err != nil {
		if ledger.NotFound(err) {
			e.err = errors.New("unknown key")
		} else {
			e.err = httpsig.Unavailable{Err: fmt.Errorf("ledger unreachable: %v", err)}
			e.at = time.Time{} // ask again next time
		}
		return e
	}
	if k.RevokedAt != nil {
		e.err = errors.New("key is revoked")
		return e
	}
	u, err := a.ledger.User(ctx, k.User)
	if err != nil {
		e.err = fmt.Errorf("user %s: %v", k.User, err)
		if !ledger.NotFound(err) {
			e.err = httpsig.Unavailable{Err: e.err}
		}
		e.at = time.Time{}
		return e
	}
	if u.Disabled {
		e.err = fmt.Errorf("user %s is disabled", u.Name)
		return e
	}
	pub, _, err := keys.ParsePublic(k.PublicKey)
	if err != nil {
		e.err = err
		return e
	}
	e.pub, e.p = pub, &principal{user: u.Name, roles: u.Roles}
	return e
}

// stream takes one of p's stream slots; release gives it back. A user
// past its limit gets 429.
func (a *auth) stream(p *principal) (release func(), err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.streams[p.user] >= a.limit {
		return nil, &httpapi.Error{Status: http.StatusTooManyRequests, Reason: "too_many_streams",
			Msg: fmt.Sprintf("user %s has %d event streams and waits open, the most coord allows; close one", p.user, a.limit)}
	}
	a.streams[p.user]++
	return func() {
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.streams[p.user]--; a.streams[p.user] <= 0 {
			delete(a.streams, p.user)
		}
	}, nil
}

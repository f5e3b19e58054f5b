package ledger

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/writ-fleet/writ/httpsig"
	"github.com/writ-fleet/writ/internal/httpapi"
	"github.com/writ-fleet/writ/keys"
)

// Client talks to a ledger's HTTP API. Admin calls need Key.
type Client struct {
	// BaseURL is the ledger's address, e.g. https://10.0.0.1:7701, or
	// several ledger processes' addresses separated by commas: a call
	// that cannot reach one (no connection, or 502/503/504) goes to the
	// next, and the client stays with the last one that answered.
	BaseURL string
	// Key signs admin calls (and a node's calls); optional for reads.
	Key *keys.Key
	// KeyID, when set, is the signature's keyid instead of Key.ID: a node
	// signs as its node ID.
	KeyID string
	// HTTP is the HTTP client; nil means one with a 10 s timeout.
	HTTP *http.Client
	// Verify checks trust snapshots' signatures; nil takes unsigned ones
	// (a ledger on plain HTTP).
	Verify *TrustVerifier

	good atomic.Int32 // index in BaseURL of the address that answered last
}

// APIError is a non-2xx answer from the ledger.
type APIError struct {
	Status int
	Body   httpapi.ErrorBody
}

func (e *APIError) Error() string {
	return fmt.Sprintf("ledger: %s (HTTP %d)", e.Body.Error, e.Status)
}

// NotFound reports whether err is a 404 from the ledger.
func NotFound(err error) bool {
	var e *APIError
	return errors.As(err, &e) && e.Status == http.StatusNotFound
}

var defaultHTTP = &http.Client{Timeout: 10 * time.Second}

// bases returns the client's addresses, the one that answered last first.
func (c *Client) bases() []string {
	all := strings.Split(c.BaseURL, ",")
	for i := range all {
		all[i] = strings.TrimRight(strings.TrimSpace(all[i]), "/")
	}
	if len(all) == 1 {
		return all
	}
	start := int(c.good.Load()) % len(all)
	return append(all[start:], all[:start]...)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any, signed bool) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return err
		}
	}
	bases := c.bases()
	var err error
	for _, base := range bases {
		var retry bool
		retry, err = c.doAt(ctx, base, method, path, body, in != nil, out, signed)
		if !retry || ctx.Err() != nil {
			if err == nil && len(bases) > 1 {
				all := strings.Split(c.BaseURL, ",")
				for j := range all {
					if strings.TrimRight(strings.TrimSpace(all[j]), "/") == base {
						c.good.Store(int32(j))
					}
				}
			}
			return err
		}
	}
	return err
}

// doAt makes one call to the ledger at base. retry reports a failure the
// next address may not have: no connection, or the ledger saying it is
// unavailable.
func (c *Client) doAt(ctx context.Context, base, method, path string, body []byte, hasBody bool, out any, signed bool) (retry bool, _ error) {
	req, err := http.NewRequestWithContext(ctx, method, base+path, bytes.NewReader(body))
	if err != nil {
		return false, fmt.Errorf("ledger request: %w", err)
	}
	if hasBody {
		req.Header.Set("Content-Type", "application/json")
	}
	if signed {
		if c.Key == nil {
			return false, errors.New("ledger: this call must be signed; no key given")
		}
		keyID := c.Key.ID
		if c.KeyID != "" {
			keyID = c.KeyID
		}
		if err := httpsig.Sign(req, body, keyID, c.Key.Private, time.Now()); err != nil {
			return false, err
		}
	}
	hc := c.HTTP
	if hc == nil {
		hc = defaultHTTP
	}
	resp, err := hc.Do(req)
	if err != nil {
		return true, fmt.Errorf("ledger %s: %w", base, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return true, fmt.Errorf("ledger %s: read reply: %w", base, err)
	}
	if resp.StatusCode/100 != 2 {
		e := &APIError{Status: resp.StatusCode}
		if json.Unmarshal(data, &e.Body) != nil || e.Body.Error == "" {
			e.Body.Error = strings.TrimSpace(string(data))
		}
		switch resp.StatusCode {
		case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			return true, e
		}
		return false, e
	}
	if raw, ok := out.(rawReply); ok {
		*raw.b = data
		return false, nil
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return false, fmt.Errorf("ledger %s: decode reply: %w", base, err)
		}
	}
	return false, nil
}

// Site returns one site.
func (c *Client) Site(ctx context.Context, name string) (*Site, error) {
	var s Site
	return &s, c.do(ctx, http.MethodGet, "/v1/sites/"+url.PathEscape(name), nil, &s, false)
}

// Sites lists sites.
func (c *Client) Sites(ctx context.Context) ([]Site, error) {
	var s []Site
	return s, c.do(ctx, http.MethodGet, "/v1/sites", nil, &s, false)
}

// Trust returns a site's trust snapshot, ready for Authorize.
func (c *Client) Trust(ctx context.Context, site string) (*Trust, error) {
	var st SignedTrust
	if err := c.do(ctx, http.MethodGet, "/v1/sites/"+url.PathEscape(site)+"/trust", nil, &st, false); err != nil {
		return nil, err
	}
	t, err := c.Verify.Open(&st, site, time.Now())
	if err != nil {
		return nil, fmt.Errorf("ledger %s: %w", c.BaseURL, err)
	}
	return t, nil
}

// KeyByID returns one key by its ID.
func (c *Client) KeyByID(ctx context.Context, id string) (*Key, error) {
	var k Key
	return &k, c.do(ctx, http.MethodGet, "/v1/keys?id="+url.QueryEscape(id), nil, &k, false)
}

// User returns one user.
func (c *Client) User(ctx context.Context, name string) (*User, error) {
	var u User
	return &u, c.do(ctx, http.MethodGet, "/v1/users/"+url.PathEscape(name), nil, &u, false)
}

// Users lists users.
func (c *Client) Users(ctx context.Context) ([]User, error) {
	var u []User
	return u, c.do(ctx, http.MethodGet, "/v1/users", nil, &u, false)
}

// CreateUser creates a user (admin).
func (c *Client) CreateUser(ctx context.Context, req CreateUserRequest) (*User, error) {
	var u User
	return &u, c.do(ctx, http.MethodPost, "/v1/users", req, &u, true)
}

// AddKey adds a public key (authorized_keys line) to a user (admin).
func (c *Client) AddKey(ctx context.Context, user, publicKey string) (*Key, error) {
	var k Key
	return &k, c.do(ctx, http.MethodPost, "/v1/users/"+url.PathEscape(user)+"/keys", map[string]string{"public_key": publicKey}, &k, true)
}

// SetRole binds a user's role on a site; "" removes it (admin).
func (c *Client) SetRole(ctx context.Context, user, site, role string) error {
	return c.do(ctx, http.MethodPost, "/v1/users/"+url.PathEscape(user)+"/roles", map[string]string{"site": site, "role": role}, nil, true)
}

// RevokeKey revokes a key (admin).
func (c *Client) RevokeKey(ctx context.Context, keyID string) error {
	return c.do(ctx, http.MethodPost, "/v1/keys/revoke", map[string]string{"key_id": keyID}, nil, true)
}

// PutSite creates or replaces a site (admin).
func (c *Client) PutSite(ctx context.Context, s Site) error {
	return c.do(ctx, http.MethodPut, "/v1/sites/"+url.PathEscape(s.Name), s, nil, true)
}

// Defaults for TrustCache.
const (
	DefaultTrustTTL = 10 * time.Second
	// DefaultStaleGrace lets a site run through a ledger outage of ten
	// minutes on the snapshot it had (a revocation cannot reach it then
	// anyway); past that, jobs wait (retried) until the ledger is back.
	DefaultStaleGrace = 10 * time.Minute
	// missRefresh is how soon after a fetch an unknown key may trigger
	// another one, so a newly added key works at once without letting
	// garbage key IDs hammer the ledger.
	missRefresh = time.Second
)

// TrustCache keeps each site's trust snapshot for TTL, so verifiers do not
// ask the ledger per job. A revoked key stops verifying within TTL. A
// signature by a key the snapshot does not know refreshes it early (at most
// once a second). When the ledger is unreachable a snapshot is used up to
// StaleGrace past its TTL, then verification fails as an infrastructure
// error; so does a key the snapshot does not know.
type TrustCache struct {
	Client *Client
	// TTL is how long a snapshot is used; zero means DefaultTrustTTL.
	TTL time.Duration
	// StaleGrace is how long past TTL a snapshot serves while the ledger is
	// unreachable; zero means DefaultStaleGrace.
	StaleGrace time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time

	group   singleflight.Group
	mu      sync.Mutex
	entries map[string]*trustEntry // guarded by mu
}

type trustEntry struct {
	trust   *Trust
	fetched time.Time
}

// ErrLedgerUnavailable wraps failures to reach the ledger (retryable).
var ErrLedgerUnavailable = errors.New("ledger unavailable")

func (c *TrustCache) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

// Get returns the trust snapshot for site. keyIDs are the key IDs the caller
// is about to check; an unknown one triggers an early refresh.
func (c *TrustCache) Get(ctx context.Context, site string, keyIDs ...string) (*Trust, error) {
	ttl := c.TTL
	if ttl == 0 {
		ttl = DefaultTrustTTL
	}
	now := c.now()
	c.mu.Lock()
	e := c.entries[site]
	c.mu.Unlock()
	missing := false
	if e != nil {
		age := now.Sub(e.fetched)
		fresh := age < ttl
		if fresh {
			for _, id := range keyIDs {
				if !e.trust.Has(id) && age >= missRefresh {
					fresh, missing = false, true
					break
				}
			}
		}
		if fresh {
			return e.trust, nil
		}
	}
	v, err, _ := c.group.Do(site, func() (any, error) {
		t, err := c.Client.Trust(ctx, site)
		if err != nil {
			return nil, err
		}
		c.mu.Lock()
		if c.entries == nil {
			c.entries = make(map[string]*trustEntry)
		}
		c.entries[site] = &trustEntry{trust: t, fetched: c.now()}
		c.mu.Unlock()
		return t, nil
	})
	if err == nil {
		return v.(*Trust), nil
	}
	if NotFound(err) {
		return nil, err
	}
	grace := c.StaleGrace
	if grace == 0 {
		grace = DefaultStaleGrace
	}
	// A stale snapshot may serve while the ledger is away, but not to
	// refuse a key it does not know: that key may be newer than the
	// snapshot, so the honest answer is "try again later".
	if e != nil && !missing && now.Sub(e.fetched) < ttl+grace {
		return e.trust, nil
	}
	return nil, fmt.Errorf("%w: %v", ErrLedgerUnavailable, err)
}

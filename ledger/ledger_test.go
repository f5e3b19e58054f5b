package ledger_test

import (
	"context"
	"github.com/writ-fleet/writ/job"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/ledger/store/postgres"
	"github.com/writ-fleet/writ/ledger/store/sqlite"
	"github.com/writ-fleet/writ/ledger/store/sqlstore"
)

// bothStores runs fn as subtests on SQLite and on PostgreSQL.
func bothStores(t *testing.T, fn func(t *testing.T, kind string)) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) { fn(t, kind) })
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.StopPostgres()
	os.Exit(code)
}

type fixture struct {
	admin  *keys.Key
	client *ledger.Client // signs as admin
	url    string
}

func newFixture(t *testing.T) *fixture { return newFixtureOn(t, "sqlite", nil) }

// newFixtureOn serves a ledger on a fresh store of kind ("sqlite" or
// "postgres") with clock now (nil: the real clock).
func newFixtureOn(t *testing.T, kind string, now func() time.Time) *fixture {
	t.Helper()
	ctx := context.Background()
	var store *sqlstore.Store
	var err error
	if kind == "postgres" {
		store, err = postgres.Open(ctx, testenv.Postgres(t))
	} else {
		store, err = sqlite.Open(ctx, filepath.Join(t.TempDir(), "ledger.db"))
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	admin, _ := keys.Generate("root@test")
	site := &ledger.Site{Name: "local", SupervisorURL: "http://127.0.0.1:1", Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}}
	if err := ledger.Init(ctx, store, "root", admin.AuthorizedKey(), site); err != nil {
		t.Fatal(err)
	}
	if err := ledger.Init(ctx, store, "root2", admin.AuthorizedKey(), nil); err == nil {
		t.Error("second Init succeeded, want refusal")
	}
	srv := ledger.NewServer(store, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry(), now)
	hs := httptest.NewServer(srv.Handler())
	t.Cleanup(hs.Close)
	return &fixture{admin: admin, client: &ledger.Client{BaseURL: hs.URL, Key: admin}, url: hs.URL}
}

func (f *fixture) user(t *testing.T, name string, roles map[string]string) *keys.Key {
	t.Helper()
	k, _ := keys.Generate(name)
	if _, err := f.client.CreateUser(context.Background(), ledger.CreateUserRequest{Name: name, Roles: roles, PublicKeys: []string{k.AuthorizedKey()}}); err != nil {
		t.Fatalf("CreateUser(%s): %v", name, err)
	}
	return k
}

func TestServer_AdminWrites(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	alice := f.user(t, "alice", map[string]string{"local": ledger.RoleDeployer})

	// A non-admin cannot write.
	as := &ledger.Client{BaseURL: f.url, Key: alice}
	if _, err := as.CreateUser(ctx, ledger.CreateUserRequest{Name: "mallory"}); err == nil || !strings.Contains(err.Error(), "not an admin") {
		t.Errorf("CreateUser by non-admin = %v, want refusal", err)
	}
	// An unsigned write is refused.
	resp, err := http.Post(f.url+"/v1/users", "application/json", strings.NewReader(`{"name":"eve"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("unsigned POST /v1/users = %d, want 401", resp.StatusCode)
	}
	// Malformed bodies and bad values get clear 400s.
	for _, req := range []ledger.CreateUserRequest{
		{Name: "Bad Name"},
		{Name: "bob", Roles: map[string]string{"local": "superuser"}},
		{Name: "bob", PublicKeys: []string{"ssh-rsa AAAA"}},
	} {
		if _, err := f.client.CreateUser(ctx, req); err == nil || !strings.Contains(err.Error(), "HTTP 400") {
			t.Errorf("CreateUser(%+v) = %v, want HTTP 400", req, err)
		}
	}
	if _, err := f.client.CreateUser(ctx, ledger.CreateUserRequest{Name: "alice"}); err == nil || !strings.Contains(err.Error(), "HTTP 409") {
		t.Errorf("duplicate CreateUser = %v, want HTTP 409", err)
	}
	// Revocation shows in the trust snapshot.
	if err := f.client.RevokeKey(ctx, alice.ID); err != nil {
		t.Fatal(err)
	}
	tr, err := f.client.Trust(ctx, "local")
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, s := range tr.Signers {
		if s.KeyID == alice.ID {
			found = true
			if !s.Revoked {
				t.Error("revoked key not flagged in trust")
			}
		}
	}
	if !found {
		t.Error("alice's key missing from trust")
	}
	if err := f.client.PutSite(ctx, ledger.Site{Name: "bad", SupervisorURL: "ftp://x", Policy: ledger.Policy{Roles: []string{"admin"}, Threshold: 1}}); err == nil {
		t.Error("PutSite with ftp URL succeeded")
	}
}

func TestTrust_Authorize(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	if err := f.client.PutSite(ctx, ledger.Site{Name: "prod", SupervisorURL: "http://127.0.0.1:2", Policy: ledger.Policy{Roles: []string{"admin", "deployer"}, Threshold: 2}}); err != nil {
		t.Fatal(err)
	}
	a := f.user(t, "a", map[string]string{"prod": "deployer"})
	b := f.user(t, "b", map[string]string{"prod": "deployer"})
	c := f.user(t, "c", map[string]string{"prod": "deployer"})
	v := f.user(t, "v", map[string]string{"prod": "viewer"})
	revoked := f.user(t, "r", map[string]string{"prod": "deployer"})
	if err := f.client.RevokeKey(ctx, revoked.ID); err != nil {
		t.Fatal(err)
	}
	stranger, _ := keys.Generate("stranger")
	// A second key of user a still counts as user a.
	a2, _ := keys.Generate("a2")
	if _, err := f.client.AddKey(ctx, "a", a2.AuthorizedKey()); err != nil {
		t.Fatal(err)
	}
	tr, err := f.client.Trust(ctx, "prod")
	if err != nil {
		t.Fatal(err)
	}
	j := envelope.NewJob("t", "x := 1", "prod", time.Now())
	sign := func(ks ...*keys.Key) *envelope.Envelope {
		env, err := j.Sign(ks[0])
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range ks[1:] {
			env.Sign(k.ID, k.Private)
		}
		return env
	}
	tampered := sign(a, b)
	tampered.Signatures[1].Sig[0] ^= 1
	for _, tc := range []struct {
		name string
		env  *envelope.Envelope
		want job.Reason
	}{
		{"2 of 3", sign(a, b), ""},
		{"3 of 3", sign(a, b, c), ""},
		{"1 of 3", sign(a), job.ReasonBelowThreshold},
		{"same user twice", sign(a, a2), job.ReasonBelowThreshold},
		{"unknown key", sign(a, stranger), job.ReasonUnknownKey},
		{"revoked key", sign(a, revoked), job.ReasonRevokedKey},
		{"viewer", sign(a, v), job.ReasonRoleNotAllowed},
		{"bad signature", tampered, job.ReasonBadSignature},
		{"extra bad signature ignored when threshold met", func() *envelope.Envelope {
			e := sign(a, b, stranger)
			return e
		}(), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			users, err := tr.Authorize(tc.env)
			if got := envelope.ReasonOf(err); got != tc.want {
				t.Fatalf("Authorize = %v, %v; want reason %q", users, err, tc.want)
			}
			if err != nil && tc.want == job.ReasonBelowThreshold && !strings.Contains(err.Error(), "requires signatures from 2 distinct users") {
				t.Errorf("message = %q", err)
			}
		})
	}
}

// TestTrustCache_Revocation: a revoked key stops verifying (as the
// supervisor and runner verify) within the cache TTL, on both stores.
func TestTrustCache_Revocation(t *testing.T) { bothStores(t, testTrustCacheRevocation) }

func testTrustCacheRevocation(t *testing.T, kind string) {
	f := newFixtureOn(t, kind, nil)
	ctx := context.Background()
	alice := f.user(t, "alice", map[string]string{"local": "deployer"})
	now := time.Unix(1_700_000_000, 0)
	cache := &ledger.TrustCache{Client: &ledger.Client{BaseURL: f.url}, TTL: 10 * time.Second, Now: func() time.Time { return now }}
	env, _ := envelope.NewJob("t", "x := 1", "local", time.Now()).Sign(alice)
	check := func() error {
		tr, err := cache.Get(ctx, "local", alice.ID)
		if err != nil {
			t.Fatal(err)
		}
		_, err = tr.Authorize(env)
		return err
	}
	if err := check(); err != nil {
		t.Fatalf("before revocation: %v", err)
	}
	if err := f.client.RevokeKey(ctx, alice.ID); err != nil {
		t.Fatal(err)
	}
	now = now.Add(5 * time.Second)
	if err := check(); err != nil {
		t.Errorf("within TTL the cached snapshot is used; got %v", err)
	}
	now = now.Add(6 * time.Second)
	if err := check(); envelope.ReasonOf(err) != job.ReasonRevokedKey {
		t.Errorf("after TTL: %v, want revoked_key", err)
	}
	// A key added after the snapshot is picked up at once (early refresh).
	bob := f.user(t, "bob", map[string]string{"local": "deployer"})
	now = now.Add(2 * time.Second)
	tr, err := cache.Get(ctx, "local", bob.ID)
	if err != nil || !tr.Has(bob.ID) {
		t.Errorf("new key not picked up: %v", err)
	}
}

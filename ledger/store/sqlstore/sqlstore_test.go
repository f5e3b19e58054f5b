package sqlstore_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/ledger/store/postgres"
	"github.com/writ-fleet/writ/ledger/store/sqlite"
	"github.com/writ-fleet/writ/ledger/store/sqlstore"
)

// stores runs fn against a fresh SQLite store and a fresh PostgreSQL one.
func stores(t *testing.T, fn func(t *testing.T, s *sqlstore.Store)) {
	for _, name := range []string{"sqlite", "postgres"} {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			var s *sqlstore.Store
			var err error
			if name == "sqlite" {
				s, err = sqlite.Open(ctx, filepath.Join(t.TempDir(), "ledger.db"))
			} else {
				s, err = postgres.Open(ctx, testenv.Postgres(t))
			}
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			fn(t, s)
		})
	}
}

func TestStore_NodesAndUptime(t *testing.T) {
	stores(t, func(t *testing.T, s *sqlstore.Store) {
		ctx := context.Background()
		now := time.Now().UTC().Truncate(time.Millisecond)
		n := ledger.Node{ID: "n1", Site: "a", PublicKey: "ssh-ed25519 AAAA", Capacity: ledger.Capacity{CPUs: 4, MemoryMiB: 8192}, RegisteredAt: now}
		if created, err := s.RegisterNode(ctx, n, ""); err != nil || !created {
			t.Fatalf("RegisterNode = %v, %v", created, err)
		}
		n.Capacity.CPUs = 8
		if created, err := s.RegisterNode(ctx, n, ""); err != nil || created {
			t.Fatalf("RegisterNode again = %v, %v; want an update", created, err)
		}
		moved := n
		moved.Site = "b"
		if _, err := s.RegisterNode(ctx, moved, ""); !errors.Is(err, ledger.ErrConflict) {
			t.Errorf("RegisterNode on another site = %v, want ErrConflict", err)
		}
		for i, tc := range []struct {
			boot    string
			restart bool
		}{{"b1", false}, {"b1", false}, {"b2", true}, {"b2", false}} {
			restarted, _, err := s.ReportUptime(ctx, "n1", ledger.Uptime{BootID: tc.boot, UptimeSeconds: int64(i), At: now.Add(time.Duration(i) * time.Second)})
			if err != nil || restarted != tc.restart {
				t.Errorf("report %d (%s) = %v, %v; want restarted %v", i, tc.boot, restarted, err, tc.restart)
			}
		}
		got, err := s.GetNode(ctx, "n1")
		if err != nil || got.Boots != 2 || got.BootID != "b2" || got.Capacity.CPUs != 8 || got.UptimeSeconds != 3 || !got.LastReport.Equal(now.Add(3*time.Second)) {
			t.Errorf("GetNode = %+v, %v", got, err)
		}
		if _, _, err := s.ReportUptime(ctx, "nope", ledger.Uptime{BootID: "x", At: now}); !errors.Is(err, ledger.ErrNotFound) {
			t.Errorf("report for an unknown node = %v", err)
		}
		if list, _ := s.ListNodes(ctx, "a"); len(list) != 1 {
			t.Errorf("ListNodes(a) = %+v", list)
		}
		if list, _ := s.ListNodes(ctx, "b"); len(list) != 0 {
			t.Errorf("ListNodes(b) = %+v", list)
		}
	})
}

func TestStore_TokensAndAudit(t *testing.T) {
	stores(t, func(t *testing.T, s *sqlstore.Store) {
		ctx := context.Background()
		now := time.Now().UTC()
		tok := ledger.Token{ID: "t1", Site: "a", CreatedBy: "root", CreatedAt: now, ExpiresAt: now.Add(time.Hour)}
		if err := s.CreateToken(ctx, tok, "hash1"); err != nil {
			t.Fatal(err)
		}
		if err := s.CreateToken(ctx, tok, "hash2"); !errors.Is(err, ledger.ErrExists) {
			t.Errorf("a second token t1 = %v, want ErrExists", err)
		}
		got, err := s.TokenBySecret(ctx, "hash1")
		if err != nil || got.ID != "t1" || !got.Live(now) {
			t.Fatalf("TokenBySecret = %+v, %v", got, err)
		}
		if err := s.RevokeToken(ctx, "t1", now); err != nil {
			t.Fatal(err)
		}
		if got, _ := s.TokenBySecret(ctx, "hash1"); got.Live(now) {
			t.Error("a revoked token is live")
		}
		if list, _ := s.ListTokens(ctx, "a"); len(list) != 1 || list[0].RevokedAt == nil {
			t.Errorf("ListTokens = %+v", list)
		}
		for i, op := range []string{"create_user", "revoke_key"} {
			if err := s.AddAudit(ctx, ledger.AuditEntry{At: now.Add(time.Duration(i) * time.Millisecond), Actor: "root", Op: op, Target: "x"}); err != nil {
				t.Fatal(err)
			}
		}
		if list, _ := s.ListAudit(ctx, 10); len(list) != 2 || list[0].Op != "revoke_key" {
			t.Errorf("ListAudit = %+v, want newest first", list)
		}
		// Users and keys on both stores (the shared queries quote "user").
		u := ledger.User{Name: "alice", Roles: map[string]string{"a": ledger.RoleDeployer}, Keys: []ledger.Key{{ID: "SHA256:k1", PublicKey: "ssh-ed25519 AAAA"}}}
		if err := s.CreateUser(ctx, u); err != nil {
			t.Fatal(err)
		}
		if err := s.AddKey(ctx, ledger.Key{ID: "SHA256:k2", User: "bob", PublicKey: "x"}); !errors.Is(err, ledger.ErrNotFound) {
			t.Errorf("AddKey for a missing user = %v, want ErrNotFound", err)
		}
		if err := s.PutSite(ctx, ledger.Site{Name: "a", SupervisorURL: "http://x", Policy: ledger.Policy{Roles: []string{"deployer"}, Threshold: 1}, UptimeInterval: 30, ScriptMemory: 64 << 20}); err != nil {
			t.Fatal(err)
		}
		tr, err := s.Trust(ctx, "a")
		if err != nil || len(tr.Signers) != 1 || tr.Signers[0].Role != ledger.RoleDeployer || tr.Site.Interval() != 30*time.Second || tr.Site.ScriptMemory != 64<<20 {
			t.Errorf("Trust = %+v, %v", tr, err)
		}
	})
}

package testenv

import (
	"context"
	"io"
	"log/slog"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/ledger/store/sqlite"
)

// Ledger is a real ledger (SQLite store, HTTP API) for one test.
type Ledger struct {
	// URL is the ledger's address.
	URL string
	// Admin is the key of user "root", admin on every site.
	Admin *keys.Key
	// Server can be closed to make the ledger unreachable.
	Server *httptest.Server
	// Store is the ledger's store.
	Store ledger.Store
}

// Node registers a new node of site and returns its key (its ID is
// ledger.NodeID of the key's public half).
func (l *Ledger) Node(tb testing.TB, site string) *keys.Key {
	tb.Helper()
	k, err := keys.Generate("node")
	if err != nil {
		tb.Fatal(err)
	}
	n := ledger.Node{ID: ledger.NodeID(k.Public), Site: site, PublicKey: k.AuthorizedKey(), RegisteredAt: time.Now().UTC()}
	if _, err := l.Store.RegisterNode(context.Background(), n, ""); err != nil {
		tb.Fatal(err)
	}
	return k
}

// NewLedger serves a ledger with user "root" (admin on "*") and the given
// site, whose policy lets admins and deployers sign with threshold 1 when
// site.Policy is zero. Everything is removed when the test ends.
func NewLedger(tb testing.TB, site ledger.Site) *Ledger {
	tb.Helper()
	ctx := context.Background()
	store, err := sqlite.Open(ctx, filepath.Join(tb.TempDir(), "ledger.db"))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { store.Close() })
	admin, err := keys.Generate("root")
	if err != nil {
		tb.Fatal(err)
	}
	if site.Policy.Threshold == 0 {
		site.Policy = ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}
	}
	if err := ledger.Init(ctx, store, "root", admin.AuthorizedKey(), &site); err != nil {
		tb.Fatal(err)
	}
	hs := httptest.NewServer(ledger.NewServer(store, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry(), nil).Handler())
	tb.Cleanup(hs.Close)
	return &Ledger{URL: hs.URL, Admin: admin, Server: hs, Store: store}
}

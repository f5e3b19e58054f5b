package ledger_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/ledger/store/sqlite"
)

// failingTokens is a store whose token lookups fail while fail is set, as
// a busy or unreachable PostgreSQL's do.
type failingTokens struct {
	ledger.Store
	fail atomic.Bool
}

func (s *failingTokens) TokenBySecret(ctx context.Context, h string) (*ledger.Token, error) {
	if s.fail.Load() {
		return nil, errors.New("sorry, too many clients already")
	}
	return s.Store.TokenBySecret(ctx, h)
}

// TestNodes_StoreFailureIsNotABadToken: a registration whose token the
// store could not read is told to try again (503), not that its token is
// bad, and the token is not used.
func TestNodes_StoreFailureIsNotABadToken(t *testing.T) {
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "ledger.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	admin, _ := keys.Generate("root@test")
	if err := ledger.Init(ctx, st, "root", admin.AuthorizedKey(), &ledger.Site{Name: "local", SupervisorURL: "http://127.0.0.1:1", Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}}); err != nil {
		t.Fatal(err)
	}
	fs := &failingTokens{Store: st}
	hs := httptest.NewServer(ledger.NewServer(fs, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry(), nil).Handler())
	defer hs.Close()
	tok, err := (&ledger.Client{BaseURL: hs.URL, Key: admin}).CreateTokenFor(ctx, "local", ledger.CreateTokenRequest{Uses: 1})
	if err != nil {
		t.Fatal(err)
	}
	nodeKey, _ := keys.Generate("node-1")
	req := ledger.RegisterRequest{Site: "local", Token: tok.Secret, PublicKey: nodeKey.AuthorizedKey(), Capacity: ledger.Capacity{CPUs: 1, MemoryMiB: 512}}
	fs.fail.Store(true)
	_, err = ledger.NodeClient(hs.URL, nodeKey, nil).Register(ctx, req)
	if err == nil || !strings.Contains(err.Error(), "HTTP 503") {
		t.Fatalf("registration while the store fails = %v, want HTTP 503", err)
	}
	fs.fail.Store(false)
	if _, err := ledger.NodeClient(hs.URL, nodeKey, nil).Register(ctx, req); err != nil {
		t.Fatalf("registration once the store answers: %v (the token must not have been used)", err)
	}
}

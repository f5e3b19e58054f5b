package ledger_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/ledger"
)

// TestTrustCache_LedgerOutage: with the ledger away for five minutes, the
// last snapshot keeps serving (jobs keep running); past the grace the
// cache says the ledger is unavailable (jobs wait), and once the ledger is
// back a fresh snapshot serves again.
func TestTrustCache_LedgerOutage(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	var down atomic.Bool
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		resp, err := http.Get(f.url + r.URL.Path)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		w.WriteHeader(resp.StatusCode)
		buf := make([]byte, 1<<20)
		n, _ := resp.Body.Read(buf)
		w.Write(buf[:n])
	}))
	defer proxy.Close()
	clk := testenv.NewClock()
	c := &ledger.TrustCache{Client: &ledger.Client{BaseURL: proxy.URL}, Now: clk.Now}
	if _, err := c.Get(ctx, "local"); err != nil {
		t.Fatal(err)
	}
	down.Store(true)
	clk.Add(5 * time.Minute)
	if _, err := c.Get(ctx, "local"); err != nil {
		t.Fatalf("five minutes into a ledger outage: %v, want the last snapshot", err)
	}
	clk.Add(6 * time.Minute)
	if _, err := c.Get(ctx, "local"); !errors.Is(err, ledger.ErrLedgerUnavailable) {
		t.Fatalf("eleven minutes into the outage: %v, want ErrLedgerUnavailable", err)
	}
	down.Store(false)
	if _, err := c.Get(ctx, "local"); err != nil {
		t.Fatalf("ledger back: %v", err)
	}
}

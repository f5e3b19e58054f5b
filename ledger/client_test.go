package ledger_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/ledger"
)

// TestClient_NextLedger: a client given several ledger addresses goes on
// to the next when one cannot be reached or says it is unavailable, stays
// with the one that answered, and takes a refusal from a ledger as final.
func TestClient_NextLedger(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	dead := "http://" + testenv.Addr(testenv.FreePort(t)) // nothing listens
	var busyCalls atomic.Int32
	busy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		busyCalls.Add(1)
		http.Error(w, `{"error":"database unavailable"}`, http.StatusServiceUnavailable)
	}))
	defer busy.Close()
	var refusals atomic.Int32
	refusing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		refusals.Add(1)
		http.Error(w, `{"error":"no such site"}`, http.StatusNotFound)
	}))
	defer refusing.Close()

	c := &ledger.Client{BaseURL: dead + ", " + busy.URL + "," + f.url, Key: f.admin}
	for i := 0; i < 3; i++ {
		if _, err := c.Sites(ctx); err != nil {
			t.Fatalf("call %d through a dead and a busy ledger: %v", i, err)
		}
	}
	if n := busyCalls.Load(); n != 1 {
		t.Errorf("the busy ledger was asked %d times; after the first call the client should stay with the one that answered", n)
	}
	// Signed calls too: each address gets its own signature (its authority).
	fresh := &ledger.Client{BaseURL: dead + "," + f.url, Key: f.admin}
	if _, err := fresh.CreateUser(ctx, ledger.CreateUserRequest{Name: "carol", Roles: map[string]string{"local": "viewer"}}); err != nil {
		t.Fatalf("signed call past a dead ledger: %v", err)
	}

	c2 := &ledger.Client{BaseURL: refusing.URL + "," + f.url}
	if _, err := c2.Site(ctx, "local"); !ledger.NotFound(err) {
		t.Fatalf("a ledger's 404 = %v, want it returned as is", err)
	}
	if refusals.Load() != 1 {
		t.Errorf("refusing ledger asked %d times", refusals.Load())
	}

	all := &ledger.Client{BaseURL: dead + "," + busy.URL}
	if _, err := all.Sites(ctx); err == nil {
		t.Fatal("every ledger down, and the call succeeded")
	}
}

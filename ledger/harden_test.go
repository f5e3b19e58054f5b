package ledger_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/writ-fleet/writ/httpsig"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/ledger/store/postgres"
	"github.com/writ-fleet/writ/ledger/store/sqlite"
	"github.com/writ-fleet/writ/ledger/store/sqlstore"
)

// signedRegister builds a registration request for body, signed by k over
// signedBody (the same bytes, unless a test forges).
func signedRegister(t *testing.T, url string, k *keys.Key, signedBody, body []byte, nonce string) *http.Request {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, url+"/v1/nodes/register", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if err := httpsig.Sign(req, signedBody, ledger.NodeID(k.Public), k.Private, time.Now()); err != nil {
		t.Fatal(err)
	}
	if nonce != "" {
		in := req.Header.Get("Signature-Input")
		i := strings.Index(in, `;nonce="`)
		req.Header.Set("Signature-Input", in[:i]+`;nonce="`+nonce+`"`)
	}
	req.Body = io.NopCloser(bytes.NewReader(body))
	req.ContentLength = int64(len(body))
	return req
}

// TestLedger_ForgedCapacity: a registration signed for 4 CPUs and sent
// with 100000 is refused (the body's digest is checked before the body is
// used), and nothing is stored.
func TestLedger_ForgedCapacity(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	tok, err := f.client.CreateToken(ctx, "local", 0)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := keys.Generate("node")
	reg := ledger.RegisterRequest{Site: "local", Token: tok.Secret, PublicKey: k.AuthorizedKey(), Capacity: ledger.Capacity{CPUs: 4}}
	signed, _ := json.Marshal(reg)
	reg.Capacity.CPUs = 100000
	forged, _ := json.Marshal(reg)
	resp, err := http.DefaultClient.Do(signedRegister(t, f.url, k, signed, forged, ""))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(string(b), "content-digest") {
		t.Errorf("forged capacity = %d %s, want 401 naming the digest", resp.StatusCode, b)
	}
	if nodes, _ := f.client.Nodes(ctx, "local"); len(nodes) != 0 {
		t.Errorf("a forged registration stored %+v", nodes)
	}
	// The honest request registers with 4.
	resp, err = http.DefaultClient.Do(signedRegister(t, f.url, k, signed, signed, ""))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if nodes, _ := f.client.Nodes(ctx, "local"); resp.StatusCode != http.StatusCreated || len(nodes) != 1 || nodes[0].Capacity.CPUs != 4 {
		t.Errorf("honest registration = %d, %+v", resp.StatusCode, nodes)
	}
}

// TestLedger_NonceFlood: bad-token registrations with big nonces are
// refused before anything is kept: a nonce longer than the bound is
// refused at parsing, one within it is not kept when the token is bad, and
// past the per-source burst the flood gets 429 without work. The heap stays
// flat.
func TestLedger_NonceFlood(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	store, err := sqlite.Open(ctx, filepath.Join(dir, "ledger.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	admin, _ := keys.Generate("root")
	if err := ledger.Init(ctx, store, "root", admin.AuthorizedKey(), &ledger.Site{Name: "local", SupervisorURL: "http://127.0.0.1:1", Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}}); err != nil {
		t.Fatal(err)
	}
	srv := ledger.NewServer(store, slog.New(slog.DiscardHandler), prometheus.NewRegistry(), nil)
	hs := httptest.NewServer(srv.Handler())
	defer hs.Close()

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	codes := map[int]int{}
	big := strings.Repeat("n", 512<<10) // 512 KiB of nonce
	for i := range 200 {
		k, _ := keys.Generate("flood")
		body, _ := json.Marshal(ledger.RegisterRequest{Site: "local", Token: "writ-enroll-bogus", PublicKey: k.AuthorizedKey()})
		nonce := big
		if i%2 == 1 {
			nonce = "" // httpsig's own: the signature verifies, the token does not
		}
		resp, err := http.DefaultClient.Do(signedRegister(t, hs.URL, k, body, body, nonce))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		codes[resp.StatusCode]++
	}
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if codes[http.StatusCreated]+codes[http.StatusOK] != 0 {
		t.Errorf("the flood registered nodes: %v", codes)
	}
	if codes[http.StatusForbidden] == 0 {
		t.Errorf("no well-signed request reached the token check: %v", codes)
	}
	if codes[http.StatusTooManyRequests] == 0 {
		t.Errorf("200 registrations from one source were never throttled: %v", codes)
	}
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 8<<20 {
		t.Errorf("heap grew %d MiB under the flood", grew>>20)
	}
	if n := countNonces(t, store); n != 0 {
		t.Errorf("%d nonces kept from refused requests", n)
	}
	t.Logf("status codes: %v; heap %d → %d KiB", codes, before.HeapAlloc>>10, after.HeapAlloc>>10)
}

func countNonces(t *testing.T, store *sqlstore.Store) int {
	t.Helper()
	var n int
	if err := store.DB().QueryRow(`SELECT COUNT(*) FROM request_nonces`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestLedger_ReplayAcrossProcesses: two ledger servers on one store (two
// database handles, as two processes have) share the replay guard: an
// admin request replayed to the second is refused, and so is one replayed
// after the first restarts. A request addressed to another server is
// refused too.
func TestLedger_ReplayAcrossProcesses(t *testing.T) {
	bothStores(t, func(t *testing.T, kind string) {
		ctx := context.Background()
		open := storeOpener(t, kind)
		s1 := open()
		admin, _ := keys.Generate("root")
		if err := ledger.Init(ctx, s1, "root", admin.AuthorizedKey(), nil); err != nil {
			t.Fatal(err)
		}
		serve := func(s *sqlstore.Store, authorities ...string) *httptest.Server {
			srv := ledger.NewServer(s, slog.New(slog.DiscardHandler), prometheus.NewRegistry(), nil)
			srv.Harden(ledger.ServerOptions{Authorities: authorities})
			hs := httptest.NewServer(srv.Handler())
			t.Cleanup(hs.Close)
			return hs
		}
		a, b := serve(s1), serve(open())
		body := []byte(`{"name":"carol","roles":{"*":"viewer"},"public_keys":[]}`)
		req, _ := http.NewRequest(http.MethodPost, a.URL+"/v1/users", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		// Signed for authority "ledger.test", sent to each server's address
		// with that Host.
		req.Host = "ledger.test"
		if err := httpsig.Sign(req, body, admin.ID, admin.Private, time.Now()); err != nil {
			t.Fatal(err)
		}
		send := func(base string) int {
			r := req.Clone(ctx)
			r.URL, _ = r.URL.Parse(base + "/v1/users")
			r.Host = "ledger.test"
			r.Body = io.NopCloser(bytes.NewReader(body))
			resp, err := http.DefaultClient.Do(r)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			return resp.StatusCode
		}
		if code := send(a.URL); code != http.StatusOK {
			t.Fatalf("first = %d", code)
		}
		if code := send(b.URL); code != http.StatusUnauthorized {
			t.Errorf("replayed to a second ledger = %d, want 401", code)
		}
		c := serve(open()) // a restarted ledger
		if code := send(c.URL); code != http.StatusUnauthorized {
			t.Errorf("replayed after a restart = %d, want 401", code)
		}
		named := serve(open(), "ledger.example.net")
		if code := send(named.URL); code != http.StatusUnauthorized {
			t.Errorf("a request signed for ledger.test, sent to ledger.example.net = %d, want 401", code)
		}
	})
}

// storeOpener returns a func opening one fresh store of kind again and
// again (each call a new database handle, as another process would have).
func storeOpener(t *testing.T, kind string) func() *sqlstore.Store {
	t.Helper()
	var url string
	if kind == "postgres" {
		url = testenv.Postgres(t)
	} else {
		url = filepath.Join(t.TempDir(), "ledger.db")
	}
	return func() *sqlstore.Store {
		var s *sqlstore.Store
		var err error
		if kind == "postgres" {
			s, err = postgres.Open(context.Background(), url)
		} else {
			s, err = sqlite.Open(context.Background(), url)
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
}

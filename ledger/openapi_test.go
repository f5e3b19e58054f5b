package ledger_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"
	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/ledger/store/sqlite"
)

func loadDoc(t *testing.T) *openapi3.T {
	t.Helper()
	doc, err := openapi3.NewLoader().LoadFromData(ledger.OpenAPI)
	if err != nil {
		t.Fatal(err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		t.Fatalf("openapi.yaml: %v", err)
	}
	return doc
}

// TestOpenAPI_Routes holds the document and the handlers to each other:
// every route is documented and every documented operation is served.
func TestOpenAPI_Routes(t *testing.T) {
	doc := loadDoc(t)
	store, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "l.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	h := ledger.NewServer(store, slog.New(slog.DiscardHandler), prometheus.NewRegistry(), nil).Handler()
	var served []string
	chi.Walk(h.(chi.Routes), func(method, route string, _ http.Handler, _ ...func(http.Handler) http.Handler) error {
		if strings.HasPrefix(route, "/v1/") {
			served = append(served, method+" "+strings.TrimPrefix(strings.TrimSuffix(route, "/"), "/v1"))
		}
		return nil
	})
	var documented []string
	for path, item := range doc.Paths.Map() {
		for method := range item.Operations() {
			documented = append(documented, method+" "+path)
		}
	}
	sort.Strings(served)
	sort.Strings(documented)
	if strings.Join(served, "\n") != strings.Join(documented, "\n") {
		t.Errorf("served routes:\n%s\n\ndocumented operations:\n%s", strings.Join(served, "\n"), strings.Join(documented, "\n"))
	}
}

// validating checks every request and reply against the document.
type validating struct {
	t      *testing.T
	router routers.Router
	base   string
	seen   map[string]bool
}

func (v *validating) RoundTrip(req *http.Request) (*http.Response, error) {
	var body []byte
	if req.Body != nil {
		body, _ = io.ReadAll(req.Body)
		req.Body = io.NopCloser(bytes.NewReader(body))
	}
	// Route on a copy addressed as the document's server (/v1).
	probe := req.Clone(req.Context())
	probe.Body = io.NopCloser(bytes.NewReader(body))
	route, params, err := v.router.FindRoute(probe)
	if err != nil {
		v.t.Errorf("%s %s: not in the document: %v", req.Method, req.URL.Path, err)
		return http.DefaultTransport.RoundTrip(req)
	}
	in := &openapi3filter.RequestValidationInput{Request: probe, PathParams: params, Route: route,
		Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc}}
	if err := openapi3filter.ValidateRequest(req.Context(), in); err != nil {
		v.t.Errorf("request %s %s breaks the document: %v", req.Method, req.URL.Path, err)
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	data, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(data))
	out := &openapi3filter.ResponseValidationInput{RequestValidationInput: in, Status: resp.StatusCode, Header: resp.Header}
	out.SetBodyBytes(data)
	if err := openapi3filter.ValidateResponse(req.Context(), out); err != nil {
		v.t.Errorf("reply %d to %s %s breaks the document: %v", resp.StatusCode, req.Method, req.URL.Path, err)
	}
	v.seen[route.Operation.OperationID] = true
	return resp, nil
}

// TestOpenAPI_Validated drives every operation through clients whose
// requests and replies are validated against the document, on both stores.
func TestOpenAPI_Validated(t *testing.T) {
	doc := loadDoc(t)
	bothStores(t, func(t *testing.T, kind string) {
		ctx := context.Background()
		f := newFixtureOn(t, kind, nil)
		d := *doc
		d.Servers = openapi3.Servers{{URL: f.url + "/v1"}}
		router, err := legacy.NewRouter(&d)
		if err != nil {
			t.Fatal(err)
		}
		v := &validating{t: t, router: router, seen: map[string]bool{}}
		hc := &http.Client{Transport: v}
		admin := &ledger.Client{BaseURL: f.url, Key: f.admin, HTTP: hc}
		must := func(what string, err error) {
			t.Helper()
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		}
		must("PutSite", admin.PutSite(ctx, ledger.Site{Name: "lab", SupervisorURL: "http://127.0.0.1:9", Policy: ledger.Policy{Roles: []string{"admin"}, Threshold: 1}, UptimeInterval: 30, ScriptMemory: 128 << 20}))
		_, err = admin.Sites(ctx)
		must("Sites", err)
		_, err = admin.Site(ctx, "lab")
		must("Site", err)
		_, err = admin.Trust(ctx, "lab")
		must("Trust", err)
		bob, _ := keys.Generate("bob")
		_, err = admin.CreateUser(ctx, ledger.CreateUserRequest{Name: "bob", Roles: map[string]string{"lab": "admin"}, PublicKeys: []string{bob.AuthorizedKey()}})
		must("CreateUser", err)
		_, err = admin.Users(ctx)
		must("Users", err)
		_, err = admin.User(ctx, "bob")
		must("User", err)
		k2, _ := keys.Generate("bob-2")
		_, err = admin.AddKey(ctx, "bob", k2.AuthorizedKey())
		must("AddKey", err)
		k3, _ := keys.Generate("bob-3")
		_, err = admin.RotateKey(ctx, "bob", k2.ID, k3.AuthorizedKey())
		must("RotateKey", err)
		must("SetRole", admin.SetRole(ctx, "bob", "lab", "deployer"))
		must("RevokeKey", admin.RevokeKey(ctx, bob.ID))
		_, err = admin.GetKey(ctx, bob.ID)
		must("GetKey", err)
		_, err = admin.SetDisabled(ctx, "bob", true)
		must("disable", err)
		_, err = admin.SetDisabled(ctx, "bob", false)
		must("enable", err)
		tok, err := admin.CreateToken(ctx, "lab", 600)
		must("CreateToken", err)
		_, err = admin.Tokens(ctx, "lab")
		must("Tokens", err)
		nk, _ := keys.Generate("n")
		nc := ledger.NodeClient(f.url, nk, nil)
		nc.HTTP = hc
		n, err := nc.Register(ctx, ledger.RegisterRequest{Site: "lab", Token: tok.Secret, PublicKey: nk.AuthorizedKey(), Capacity: ledger.Capacity{CPUs: 2, MemoryMiB: 2048}})
		must("Register", err)
		_, err = nc.ReportUptime(ctx, n.ID, ledger.Uptime{BootID: "b1", UptimeSeconds: 3, At: timeNow()})
		must("ReportUptime", err)
		_, err = admin.Nodes(ctx, "lab")
		must("Nodes", err)
		_, err = admin.Node(ctx, n.ID)
		must("Node", err)
		_, err = admin.RevokeToken(ctx, "lab", tok.ID)
		must("RevokeToken", err)
		_, err = admin.RevokeNode(ctx, n.ID)
		must("RevokeNode", err)
		_, err = admin.Audit(ctx)
		must("Audit", err)
		_, err = admin.OpenAPI(ctx)
		must("OpenAPI", err)
		// Error replies are documented too.
		if _, err := admin.Node(ctx, "n0000"); !ledger.NotFound(err) {
			t.Errorf("Node of a missing node = %v", err)
		}
		var missing []string
		for _, path := range doc.Paths.Map() {
			for _, op := range path.Operations() {
				if !v.seen[op.OperationID] {
					missing = append(missing, op.OperationID)
				}
			}
		}
		if len(missing) > 0 {
			sort.Strings(missing)
			t.Errorf("operations never exercised: %v", missing)
		}
	})
}

func timeNow() time.Time { return time.Now() }

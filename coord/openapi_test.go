package coord

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"sort"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/go-chi/chi/v5"

	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
)

// TestOpenAPI_Routes holds openapi.yaml and the handlers to each other:
// every route is documented and every documented operation is served.
func TestOpenAPI_Routes(t *testing.T) {
	doc, err := openapi3.NewLoader().LoadFromData(OpenAPI)
	if err != nil {
		t.Fatal(err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		t.Fatalf("openapi.yaml: %v", err)
	}
	rdb, err := queue.Connect(testenv.Redis(t))
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	lc := &ledger.Client{BaseURL: "http://127.0.0.1:1"}
	c, err := New(Params{Redis: rdb, Ledger: lc, Trust: &ledger.TrustCache{Client: lc}, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	var served []string
	chi.Walk(c.Handler().(chi.Routes), func(method, route string, _ http.Handler, _ ...func(http.Handler) http.Handler) error {
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

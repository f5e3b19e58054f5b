package ledger

import (
	_ "embed"
	"net/http"
)

// OpenAPI is the ledger API's OpenAPI 3 document.
//
//go:embed openapi.yaml
var OpenAPI []byte

func serveOpenAPI(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/yaml")
	w.Write(OpenAPI)
}

package coord

import _ "embed"

// OpenAPI is coord's API as an OpenAPI 3 document.
//
//go:embed openapi.yaml
var OpenAPI []byte

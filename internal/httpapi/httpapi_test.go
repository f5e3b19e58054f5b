package httpapi

import (
	"context"
	"net"
	"net/http"
	"strings"
	"testing"
)

// TestServe_HeaderBound: a request whose header passes MaxHeaderBytes (Go
// reads 4 KiB past it before it refuses) is
// refused (431) before any handler runs; one inside it is served.
func TestServe_HeaderBound(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) }))
	}()
	defer func() { cancel(); <-done }()
	for _, tc := range []struct {
		size int
		want int
	}{{MaxHeaderBytes / 2, http.StatusNoContent}, {2 * MaxHeaderBytes, http.StatusRequestHeaderFieldsTooLarge}} {
		req, _ := http.NewRequest("GET", "http://"+ln.Addr().String()+"/", nil)
		req.Header.Set("X-Big", strings.Repeat("x", tc.size))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("header of %d bytes: %v", tc.size, err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("header of %d bytes: status %d, want %d", tc.size, resp.StatusCode, tc.want)
		}
	}
}

package efi

import (
	"log/slog"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

var macRe = regexp.MustCompile(`^[0-9a-f]{2}(-[0-9a-f]{2}){5}$`)

// Server serves an image directory to netbooting nodes: the kernel, the
// public initramfs (no token, no password), and boot.ipxe, which a node
// may ask for with ?mac=${net0/mac}: a file DIR/mac/aa-bb-cc-dd-ee-ff.ipxe,
// when present, overrides the default for that machine (another site,
// another command line, a single-use token on it: the MAC allowlist). It
// never serves the UKI or the USB image, which hold the token. Every
// request is logged.
type Server struct {
	Dir string
	Log *slog.Logger
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rec := &statusWriter{ResponseWriter: w, status: http.StatusOK}
	defer func() {
		s.Log.Info("image request", "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path, "mac", r.URL.Query().Get("mac"),
			"status", rec.status, "bytes", rec.bytes, "took", time.Since(start).Round(time.Microsecond))
	}()
	name := strings.TrimPrefix(r.URL.Path, "/")
	switch name {
	case "", IPXEFile:
		path := filepath.Join(s.Dir, IPXEFile)
		if mac := strings.ReplaceAll(strings.ToLower(r.URL.Query().Get("mac")), ":", "-"); macRe.MatchString(mac) {
			if p := filepath.Join(s.Dir, "mac", mac+".ipxe"); fileExists(p) {
				path = p
			}
		}
		rec.Header().Set("Content-Type", "text/plain")
		http.ServeFile(rec, r, path)
	case KernelFile, InitrdFile:
		http.ServeFile(rec, r, filepath.Join(s.Dir, name))
	default:
		http.NotFound(rec, r)
	}
}

type statusWriter struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (w *statusWriter) WriteHeader(code int) { w.status = code; w.ResponseWriter.WriteHeader(code) }
func (w *statusWriter) Write(b []byte) (int, error) {
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	return n, err
}

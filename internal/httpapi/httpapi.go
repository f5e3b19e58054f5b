// Package httpapi holds what every writ HTTP service shares: JSON replies,
// error bodies, bounded body reading, the operational endpoints (/healthz,
// /readyz, /metrics) and request logging.
package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/writ-fleet/writ/pki"
)

// ErrorBody is the JSON body of every error reply.
type ErrorBody struct {
	Error  string `json:"error"`
	Reason string `json:"reason,omitempty"`
}

// Error is an error with an HTTP status and an optional machine reason.
type Error struct {
	Status int
	Reason string
	Msg    string
}

func (e *Error) Error() string { return e.Msg }

// Errorf returns an *Error.
func Errorf(status int, format string, a ...any) error {
	return &Error{Status: status, Msg: fmt.Sprintf(format, a...)}
}

// JSON writes v with status.
func JSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// Fail writes err as an ErrorBody; an *Error sets status and reason, anything
// else is a 500.
func Fail(w http.ResponseWriter, err error) {
	var e *Error
	if errors.As(err, &e) {
		JSON(w, e.Status, ErrorBody{Error: e.Msg, Reason: e.Reason})
		return
	}
	JSON(w, http.StatusInternalServerError, ErrorBody{Error: err.Error()})
}

// ReadBody reads at most limit bytes; a larger body is a 413 error.
func ReadBody(r *http.Request, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if err != nil {
		return nil, Errorf(http.StatusBadRequest, "read body: %v", err)
	}
	if int64(len(b)) > limit {
		return nil, &Error{Status: http.StatusRequestEntityTooLarge, Reason: "too_large", Msg: fmt.Sprintf("request body is larger than %d bytes", limit)}
	}
	return b, nil
}

// DecodeJSON decodes body strictly (no unknown fields) into v.
func DecodeJSON(body []byte, v any) error {
	dec := json.NewDecoder(bytesReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &Error{Status: http.StatusBadRequest, Reason: "malformed", Msg: "malformed JSON body: " + err.Error()}
	}
	return nil
}

// RequirePeer lets a request through only from a client that showed a
// certificate of the site CA, with one of names as its holder when names
// are given; others get 403. A plain-HTTP request (no TLS) passes: writ
// serves plain HTTP only on loopback, when told to (--insecure-http).
func RequirePeer(names ...string) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.TLS != nil {
				peer := pki.PeerName(r)
				if peer == "" {
					JSON(w, http.StatusUnauthorized, ErrorBody{Error: "this endpoint needs a client certificate of the site CA", Reason: "unauthenticated"})
					return
				}
				if len(names) > 0 && !slices.Contains(names, peer) {
					JSON(w, http.StatusForbidden, ErrorBody{Error: fmt.Sprintf("service %q may not call this endpoint (only %s)", peer, strings.Join(names, ", ")), Reason: "forbidden"})
					return
				}
			}
			next.ServeHTTP(w, r)
		})
	}
}

// Ops mounts /healthz (the process answers), /readyz (ready reports nil)
// and /metrics (reg) on r, and /debug/pprof when $WRIT_PPROF is 1. Over
// TLS they answer only clients with a certificate of the site CA
// (RequirePeer): they tell a stranger what runs and how busy it is.
func Ops(r chi.Router, reg *prometheus.Registry, ready func(context.Context) error) {
	r.Group(func(r chi.Router) {
		r.Use(RequirePeer())
		ops(r, reg, ready)
	})
}

func ops(r chi.Router, reg *prometheus.Registry, ready func(context.Context) error) {
	r.Get("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		JSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	r.Get("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if ready != nil {
			if err := ready(ctx); err != nil {
				JSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not ready", "error": err.Error()})
				return
			}
		}
		JSON(w, http.StatusOK, map[string]string{"status": "ready"})
	})
	r.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	// Profiling is off unless asked for: it exposes internals.
	if os.Getenv("WRIT_PPROF") == "1" {
		r.Mount("/debug", middleware.Profiler())
	}
}

// NewRouter returns a chi router with panic recovery and request logging at
// debug level (errors at warn).
func NewRouter(log *slog.Logger) chi.Router {
	r := chi.NewRouter()
	r.Use(middleware.Recoverer)
	r.Use(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			ww := middleware.NewWrapResponseWriter(w, req.ProtoMajor)
			start := time.Now()
			next.ServeHTTP(ww, req)
			level := slog.LevelDebug
			if ww.Status() >= 500 {
				level = slog.LevelWarn
			}
			log.Log(req.Context(), level, "http", "method", req.Method, "path", req.URL.Path, "status", ww.Status(), "dur", time.Since(start))
		})
	})
	return r
}

// Bounds of every writ server, so a stranger's request costs little.
const (
	// MaxHeaderBytes bounds a request's header: the largest a writ client
	// sends are the two signature fields (4 KiB each, httpsig) and a
	// Content-Digest of 512 bytes. Go's default is 1 MiB.
	MaxHeaderBytes = 64 << 10
	// ReadHeaderTimeout bounds the wait for a request's header.
	ReadHeaderTimeout = 10 * time.Second
	// ReadTimeout bounds reading a whole request, body included: the
	// largest body (a 16 MiB batch) takes seconds on any link a fleet runs
	// on. Responses are not bounded: event streams stay open.
	ReadTimeout = 2 * time.Minute
	// IdleTimeout closes a kept-alive connection nobody uses.
	IdleTimeout = 2 * time.Minute
)

// Serve serves h on ln until ctx ends, then shuts down gracefully (waiting
// up to 5 s for requests in flight), within the bounds above.
func Serve(ctx context.Context, ln net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: ReadHeaderTimeout, ReadTimeout: ReadTimeout, IdleTimeout: IdleTimeout, MaxHeaderBytes: MaxHeaderBytes}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		// Shutdown must finish even though ctx is done.
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			srv.Close()
		}
		<-errc
		return nil
	}
}

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

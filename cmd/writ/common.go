package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/writ-fleet/writ/internal/httpapi"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
)

// Environment variables client commands take defaults from.
const (
	envCoord  = "WRIT_COORD"
	envKey    = "WRIT_KEY"
	envSite   = "WRIT_SITE"
	envLedger = "WRIT_LEDGER"
)

// Default addresses of the services.
const (
	defaultLedgerAddr     = "127.0.0.1:7701"
	defaultCoordAddr      = "127.0.0.1:7702"
	defaultSupervisorAddr = "127.0.0.1:7703"
	defaultRunnerAddr     = "127.0.0.1:7704"
	defaultRedisURL       = "redis://127.0.0.1:6379/0"
)

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// newLogger returns the services' logger: JSON when stderr is not a
// terminal (for log collectors), text otherwise.
func newLogger(cmd *cobra.Command) *slog.Logger {
	levelName, _ := cmd.Flags().GetString("log-level")
	var level slog.Level
	if err := level.UnmarshalText([]byte(levelName)); err != nil {
		level = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: level}
	if term.IsTerminal(int(os.Stderr.Fd())) {
		return slog.New(slog.NewTextHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, opts))
}

// listen opens a TCP listener with a message that names the flag to change.
func listen(addr, flag string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w (choose another address with %s)", addr, err, flag)
	}
	return ln, nil
}

// serve serves h on ln until ctx ends.
func serve(ctx context.Context, ln net.Listener, h http.Handler) error {
	return httpapi.Serve(ctx, ln, h)
}

// loadKey loads the signing key from path, $WRIT_KEY or the default path.
func loadKey(path string) (*keys.Key, error) {
	if path == "" {
		path = envOr(envKey, keys.DefaultPath())
	}
	k, err := keys.Load(path)
	if err != nil {
		return nil, fmt.Errorf("%w (make one with `writ key gen`, or point --key / $%s at an ed25519 key)", err, envKey)
	}
	return k, nil
}

var nodeSanitize = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

// defaultNodeID is the node ID a runner uses unless told: the host name.
func defaultNodeID() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "node"
	}
	return strings.Trim(nodeSanitize.ReplaceAllString(h, "-"), "-._")
}

// serviceURL is the default URL of a service at addr: HTTPS, as every
// fleet but an --insecure-http one on loopback talks.
func serviceURL(addr string) string { return "https://" + addr }

func httpURL(addr string) string {
	if strings.HasPrefix(addr, "http://") || strings.HasPrefix(addr, "https://") {
		return addr
	}
	return "http://" + addr
}

func trustTTLFlag(cmd *cobra.Command, dst *time.Duration) {
	cmd.Flags().DurationVar(dst, "trust-ttl", ledger.DefaultTrustTTL, "how long ledger keys and policies are cached: a revoked key stops working within this time (while the ledger is unreachable, the last snapshot serves up to 10 min longer)")
}

func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

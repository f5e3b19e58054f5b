package main

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/pki"
	"github.com/writ-fleet/writ/queue"
)

// Environment variables of the TLS material.
const (
	envCA      = "WRIT_CA"
	envTLSCert = "WRIT_TLS_CERT"
	envTLSKey  = "WRIT_TLS_KEY"
)

// caSource is where a command finds the CA bundle it verifies servers
// (and a service its clients) against: the root's --ca (or $WRIT_CA), read
// from the command's flags when it runs, or a file set directly (writ
// init, writ dev). No package state: each command carries its own.
type caSource struct {
	cmd  *cobra.Command
	file string
}

// path is the CA bundle's path, or "" for none.
func (s caSource) path() string {
	if s.file != "" {
		return s.file
	}
	if s.cmd != nil {
		if f := s.cmd.Flags().Lookup("ca"); f != nil {
			return f.Value.String()
		}
	}
	return os.Getenv(envCA)
}

// sec is how one process talks HTTP: TLS with the site CA (cfg), or plain
// HTTP on loopback only (cfg nil), which a service must ask for with
// --insecure-http.
type sec struct {
	cfg *pki.Config
}

// clientSec is what a client command uses: TLS when ca (its --ca or
// $WRIT_CA) names a CA, else plain HTTP (which then only reaches http://
// URLs).
func clientSec(ca string) (*sec, error) {
	if ca == "" {
		return &sec{}, nil
	}
	c := &pki.Config{CA: ca}
	if err := c.Load(); err != nil {
		return nil, err
	}
	return &sec{cfg: c}, nil
}

// serviceTLS are a service's TLS flags.
type serviceTLS struct {
	cert, key string
	insecure  bool
	ca        caSource
}

func (f *serviceTLS) add(cmd *cobra.Command) {
	f.ca.cmd = cmd
	cmd.Flags().StringVar(&f.cert, "tls-cert", os.Getenv(envTLSCert), "this service's certificate, PEM (writ ca issue; default $WRIT_TLS_CERT): it serves HTTPS with it and shows it to the services it calls")
	cmd.Flags().StringVar(&f.key, "tls-key", os.Getenv(envTLSKey), "the certificate's key, PEM (default $WRIT_TLS_KEY)")
	cmd.Flags().BoolVar(&f.insecure, "insecure-http", false, "serve and call plain HTTP, without TLS or service identities: loopback addresses only, for a fleet on one machine")
}

// load returns the service's sec: TLS needs --ca, and --tls-cert and
// --tls-key when it serves (listens); plain HTTP needs --insecure-http.
func (f *serviceTLS) load(serves bool) (*sec, error) {
	if f.insecure {
		if f.cert != "" {
			return nil, errors.New("--insecure-http and --tls-cert contradict each other: choose one")
		}
		return &sec{}, nil
	}
	caFile := f.ca.path()
	if caFile == "" {
		return nil, errors.New("TLS needs --ca (the site CA's certificate; make one with `writ ca init`), or --insecure-http for plain HTTP on loopback")
	}
	if serves && (f.cert == "" || f.key == "") {
		return nil, errors.New("serving TLS needs --tls-cert and --tls-key (make them with `writ ca issue NAME`), or --insecure-http for plain HTTP on loopback")
	}
	c := &pki.Config{CA: caFile, Cert: f.cert, Key: f.key}
	if err := c.Load(); err != nil {
		return nil, err
	}
	return &sec{cfg: c}, nil
}

// authorities are the names of s's certificate (DNS names and IP
// addresses): signed requests must be addressed to one of them, so one
// signed for another server is refused. None without TLS.
func (s *sec) authorities() []string {
	if s.cfg == nil || s.cfg.Certificate() == nil || s.cfg.Certificate().Leaf == nil {
		return nil
	}
	leaf := s.cfg.Certificate().Leaf
	out := append([]string(nil), leaf.DNSNames...)
	for _, ip := range leaf.IPAddresses {
		out = append(out, ip.String())
	}
	return out
}

// tls reports whether s talks TLS.
func (s *sec) tls() bool { return s.cfg != nil }

// name is the service's certificate name ("" without TLS).
func (s *sec) name() string {
	if s.cfg == nil {
		return ""
	}
	return s.cfg.Name()
}

// listen opens a listener on addr: TLS, or plain on a loopback address.
func (s *sec) listen(addr, flag string) (net.Listener, error) {
	if s.cfg == nil {
		if err := loopbackOnly(addr); err != nil {
			return nil, fmt.Errorf("%s %s: %w", flag, addr, err)
		}
	}
	ln, err := listen(addr, flag)
	if err != nil {
		return nil, err
	}
	return s.wrap(ln), nil
}

// wrap puts TLS on ln (or nothing, for plain HTTP).
func (s *sec) wrap(ln net.Listener) net.Listener {
	if s.cfg == nil {
		return ln
	}
	return tls.NewListener(ln, s.cfg.Server())
}

// loopbackOnly refuses an address plain HTTP may not serve on.
func loopbackOnly(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if host == "localhost" {
		return nil
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return errors.New("plain HTTP (--insecure-http) serves on loopback addresses only; give the service a certificate to serve others")
	}
	return nil
}

// client returns an HTTP client for calls to other services (timeout 0:
// none, for streams).
func (s *sec) client(timeout time.Duration) *http.Client {
	if s.cfg == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.MaxIdleConnsPerHost = 64
		return &http.Client{Transport: tr, Timeout: timeout}
	}
	return s.cfg.HTTPClient(timeout)
}

// url is addr as a URL of this process's scheme.
func (s *sec) url(addr string) string {
	if strings.HasPrefix(addr, "http://") || strings.HasPrefix(addr, "https://") {
		return addr
	}
	if s.cfg != nil {
		return "https://" + addr
	}
	return "http://" + addr
}

// checkURL refuses a plain URL when this process talks TLS, so a
// mistyped http:// never sends credentials or trusts answers in the clear.
func (s *sec) checkURL(u, flag string) error {
	for _, one := range strings.Split(u, ",") { // a ledger's several addresses
		if s.cfg != nil && strings.HasPrefix(strings.TrimSpace(one), "http://") {
			return fmt.Errorf("%s %s is plain HTTP but this process talks TLS (--ca): use https://", flag, one)
		}
	}
	return nil
}

// ledgerClient is a ledger client over s: over TLS it checks the trust
// snapshots' signatures too.
func (s *sec) ledgerClient(url string) *ledger.Client {
	c := &ledger.Client{BaseURL: url, HTTP: s.client(10 * time.Second)}
	if s.cfg != nil {
		c.Verify = &ledger.TrustVerifier{CA: s.cfg.Pool(), Name: ledger.DefaultLedgerName}
	}
	return c
}

// Environment variables of a service's Redis.
const (
	envRedis         = "WRIT_REDIS"
	envRedisPassword = "WRIT_REDIS_PASSWORD"
)

// redisFlags say how a service reaches its Redis: a URL (with the ACL
// user name, never a password) and the password from a file or the
// environment, so it is in no process's argv.
type redisFlags struct {
	url, passwordFile string
	cmd               *cobra.Command
	ca                caSource
}

func (f *redisFlags) add(cmd *cobra.Command, what string) {
	f.cmd = cmd
	f.ca.cmd = cmd
	cmd.Flags().StringVar(&f.url, "redis", envOr(envRedis, defaultRedisURL), what+": redis:// or rediss:// (TLS, verified against --ca), with the ACL user: rediss://USER@HOST:6379/0; or through Sentinel, rediss+sentinel://USER@SENTINEL1:26379/0?master_name=NAME&addr=SENTINEL2:26379&addr=SENTINEL3:26379 (writes that accept work then wait for wait_replicas=N replicas, default 1) (default $WRIT_REDIS)")
	cmd.Flags().StringVar(&f.passwordFile, "redis-password-file", "", "file holding the Redis user's password (or $WRIT_REDIS_PASSWORD); never put it in --redis")
}

// connect dials the Redis.
func (f *redisFlags) connect() (*queue.Redis, error) {
	if f.cmd != nil && f.cmd.Flags().Changed("redis") && queue.HasPassword(f.url) {
		return nil, errors.New("--redis holds a password, which every user of this machine can read in the process list: put the user in the URL and the password in --redis-password-file or $" + envRedisPassword)
	}
	creds := queue.Credentials{Password: os.Getenv(envRedisPassword)}
	if f.passwordFile != "" {
		b, err := os.ReadFile(f.passwordFile)
		if err != nil {
			return nil, fmt.Errorf("--redis-password-file: %w", err)
		}
		creds.Password = strings.TrimSpace(string(b))
	}
	if strings.HasPrefix(f.url, "rediss://") || strings.HasPrefix(f.url, "rediss+sentinel://") {
		caFile := f.ca.path()
		if caFile == "" {
			return nil, errors.New("--redis is rediss:// (TLS): give the CA that signed the Redis server's certificate with --ca")
		}
		pool, err := pki.LoadPool(caFile)
		if err != nil {
			return nil, err
		}
		creds.TLS = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}
	}
	return queue.Dial(f.url, creds)
}

// serviceSetup is what a listening service does first: load its TLS
// material, refuse a plain ledger URL over TLS, listen, and dial its Redis.
func serviceSetup(t *serviceTLS, r *redisFlags, ledgerURL, addr string) (*sec, net.Listener, *queue.Redis, error) {
	s, err := t.load(true)
	if err != nil {
		return nil, nil, nil, err
	}
	if err := s.checkURL(ledgerURL, "--ledger"); err != nil {
		return nil, nil, nil, err
	}
	ln, err := s.listen(addr, "--listen")
	if err != nil {
		return nil, nil, nil, err
	}
	rdb, err := r.connect()
	if err != nil {
		ln.Close()
		return nil, nil, nil, err
	}
	return s, ln, rdb, nil
}

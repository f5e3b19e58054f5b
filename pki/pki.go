// Package pki is writ's site certificate authority and TLS configuration:
// a CA that `writ ca init` makes, service certificates it issues (`writ ca
// issue`), and the TLS settings every listener and client uses.
//
// Every certificate's subject common name is its holder's service name
// (coord, ledger, supervisor-lab, …). Services authenticate each other with
// mutual TLS: a server asks every client for a certificate and verifies one
// when given, and a handler that serves only one service (the supervisor
// takes batches from coord only) checks the verified name (PeerName).
// Users do not hold certificates: they sign requests with their ed25519
// keys (package httpsig).
//
// Keys are ECDSA P-256: Go, OpenSSL (redis-server's TLS) and every other
// TLS stack accept them.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

// File names in a CA directory.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// Validity of what the CA makes, unless told otherwise.
const (
	CAValidity   = 10 * 365 * 24 * time.Hour
	CertValidity = 2 * 365 * 24 * time.Hour
)

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9.-]{0,62}$`)

// ValidName reports whether name may name a certificate's holder: lower
// case letters, digits, dots and dashes, at most 63 characters.
func ValidName(name string) bool { return nameRE.MatchString(name) }

// CA is a loaded certificate authority.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
	PEM  []byte // the certificate, PEM
}

// InitCA makes a new CA named name in dir (ca.crt, ca.key with mode 0600).
// It refuses to overwrite an existing CA.
func InitCA(dir, name string) (*CA, error) {
	if !ValidName(name) {
		return nil, fmt.Errorf("CA name %q: use lower-case letters, digits, dots and dashes", name)
	}
	if _, err := os.Stat(filepath.Join(dir, CAKeyFile)); err == nil {
		return nil, fmt.Errorf("%s already holds a CA (%s); remove it first to make a new one", dir, CAKeyFile)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"writ"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(CAValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, err
	}
	if err := writeFile(filepath.Join(dir, CAKeyFile), keyPEM, 0o600); err != nil {
		return nil, err
	}
	if err := writeFile(filepath.Join(dir, CACertFile), certPEM, 0o644); err != nil {
		return nil, err
	}
	return LoadCA(dir)
}

// LoadCA loads the CA in dir.
func LoadCA(dir string) (*CA, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, fmt.Errorf("CA: %w (make one with `writ ca init`)", err)
	}
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, fmt.Errorf("CA %s: %w", dir, err)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, err
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("CA %s: %s is not a CA certificate", dir, CACertFile)
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("CA %s: key cannot sign", dir)
	}
	return &CA{Cert: cert, Key: signer, PEM: certPEM}, nil
}

// Request is what a certificate is issued for.
type Request struct {
	Name     string   // the holder's service name (subject CN); also a DNS name
	DNS      []string // more DNS names
	IPs      []net.IP // IP addresses
	Validity time.Duration
}

// Issue makes a key and a certificate for req, signed by the CA, usable
// for both serving and client authentication. It returns PEM.
func (ca *CA) Issue(req Request) (certPEM, keyPEM []byte, err error) {
	if !ValidName(req.Name) {
		return nil, nil, fmt.Errorf("certificate name %q: use lower-case letters, digits, dots and dashes", req.Name)
	}
	if req.Validity <= 0 {
		req.Validity = CertValidity
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	notAfter := now.Add(req.Validity)
	if notAfter.After(ca.Cert.NotAfter) {
		notAfter = ca.Cert.NotAfter
	}
	dns := append([]string{req.Name}, req.DNS...)
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: req.Name, Organization: []string{"writ"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     dns,
		IPAddresses:  req.IPs,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err = encodeKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM, nil
}

// IssueFiles issues a certificate and writes it to certFile (0644) and its
// key to keyFile (0600).
func (ca *CA) IssueFiles(req Request, certFile, keyFile string) error {
	certPEM, keyPEM, err := ca.Issue(req)
	if err != nil {
		return err
	}
	if err := writeFile(keyFile, keyPEM, 0o600); err != nil {
		return err
	}
	return writeFile(certFile, certPEM, 0o644)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

func encodeKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// writeFile writes data to path with mode, replacing it atomically.
func writeFile(path string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, path)
}

// LoadPool reads a PEM bundle of CA certificates.
func LoadPool(file string) (*x509.CertPool, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("CA bundle: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("CA bundle %s holds no PEM certificate", file)
	}
	return pool, nil
}

// Config is one process's TLS material: the CA bundle it trusts and,
// for a service, its own certificate and key.
type Config struct {
	CA   string // CA bundle file (PEM)
	Cert string // certificate file (PEM); "" for a client without one
	Key  string // key file (PEM)

	pool *x509.CertPool
	cert *tls.Certificate
}

// Load reads the files. A config without CA is an error: writ never talks
// TLS without verifying the peer.
func (c *Config) Load() error {
	if c.CA == "" {
		return errors.New("no CA bundle given (--ca or $WRIT_CA)")
	}
	pool, err := LoadPool(c.CA)
	if err != nil {
		return err
	}
	c.pool = pool
	if (c.Cert == "") != (c.Key == "") {
		return errors.New("a certificate needs its key and a key its certificate (--tls-cert and --tls-key)")
	}
	if c.Cert != "" {
		pair, err := tls.LoadX509KeyPair(c.Cert, c.Key)
		if err != nil {
			return fmt.Errorf("certificate %s: %w", c.Cert, err)
		}
		leaf, err := x509.ParseCertificate(pair.Certificate[0])
		if err != nil {
			return err
		}
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			return fmt.Errorf("certificate %s is not issued by the CA in %s: %w", c.Cert, c.CA, err)
		}
		pair.Leaf = leaf
		c.cert = &pair
	}
	return nil
}

// Pool is the loaded CA pool.
func (c *Config) Pool() *x509.CertPool { return c.pool }

// Certificate is the loaded certificate (nil for a client without one).
func (c *Config) Certificate() *tls.Certificate { return c.cert }

// Name is the loaded certificate's holder name ("" without one).
func (c *Config) Name() string {
	if c.cert == nil {
		return ""
	}
	return c.cert.Leaf.Subject.CommonName
}

// Server returns the TLS configuration of a listener: its certificate, and
// client certificates verified against the CA when a client offers one.
func (c *Config) Server() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{*c.cert},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    c.pool,
	}
}

// Client returns the TLS configuration of a client: servers verified
// against the CA, and this process's certificate offered when it has one.
func (c *Config) Client() *tls.Config {
	t := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: c.pool}
	if c.cert != nil {
		cert := *c.cert
		t.Certificates = []tls.Certificate{cert}
	}
	return t
}

// HTTPClient returns an HTTP client over Client() with the given timeout
// (0: none, for streams).
func (c *Config) HTTPClient(timeout time.Duration) *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = c.Client()
	tr.MaxIdleConnsPerHost = 64
	return &http.Client{Transport: tr, Timeout: timeout}
}

// PeerName returns the service name of a request's verified client
// certificate, or "" when the client showed none (or the connection is not
// TLS).
func PeerName(r *http.Request) string {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
		return ""
	}
	return r.TLS.VerifiedChains[0][0].Subject.CommonName
}

// VerifyLeaf checks that der is a certificate the pool's CA issued to name,
// valid at now, and returns it.
func VerifyLeaf(pool *x509.CertPool, der []byte, name string, now time.Time) (*x509.Certificate, error) {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, err
	}
	if cert.Subject.CommonName != name {
		return nil, fmt.Errorf("certificate is %q's, not %q's", cert.Subject.CommonName, name)
	}
	return cert, nil
}

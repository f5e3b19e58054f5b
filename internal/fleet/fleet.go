// Package fleet assembles what every way of running a writ fleet needs
// alike, so that writ dev, writ redis conf and the tests make it one way:
// the fleet's CA and its services' certificates (CA), and the Redis ACL
// users of each role with their passwords (RedisUsers).
package fleet

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"path/filepath"

	"github.com/writ-fleet/writ/internal/redisproc"
	"github.com/writ-fleet/writ/pki"
	"github.com/writ-fleet/writ/queue"
)

// CA is a fleet's certificate authority in a directory, which also holds
// the certificates it issues (NAME.crt, NAME.key).
type CA struct {
	dir string
	ca  *pki.CA
}

// OpenCA loads the CA in dir, or makes one called name there.
func OpenCA(dir, name string) (*CA, error) {
	ca, err := pki.LoadCA(dir)
	if err != nil {
		if ca, err = pki.InitCA(dir, name); err != nil {
			return nil, fmt.Errorf("fleet CA: %w", err)
		}
	}
	return &CA{dir: dir, ca: ca}, nil
}

// Dir is the CA's directory.
func (c *CA) Dir() string { return c.dir }

// File is the CA certificate's path (what services and clients trust).
func (c *CA) File() string { return filepath.Join(c.dir, pki.CACertFile) }

// Issue issues service name's certificate for hosts (IP addresses, or DNS
// names) into the CA's directory, replacing one it issued before, and
// returns the certificate's and key's paths.
func (c *CA) Issue(name string, hosts ...string) (cert, key string, err error) {
	req := pki.Request{Name: name}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			req.IPs = append(req.IPs, ip)
		} else {
			req.DNS = append(req.DNS, h)
		}
	}
	cert, key = c.CertFiles(name)
	if err := c.ca.IssueFiles(req, cert, key); err != nil {
		return "", "", fmt.Errorf("certificate %s: %w", name, err)
	}
	return cert, key, nil
}

// CertFiles are the paths of service name's certificate and key.
func (c *CA) CertFiles(name string) (cert, key string) {
	return filepath.Join(c.dir, name+".crt"), filepath.Join(c.dir, name+".key")
}

// Config is the TLS configuration of service name (its certificate, the
// CA), loaded; name "" is a client without a certificate.
func (c *CA) Config(name string) (*pki.Config, error) {
	cfg := &pki.Config{CA: c.File()}
	if name != "" {
		cfg.Cert, cfg.Key = c.CertFiles(name)
	}
	if err := cfg.Load(); err != nil {
		return nil, err
	}
	return cfg, nil
}

// Loopback are the hosts of a service reached on this machine only.
var Loopback = []string{"localhost", "127.0.0.1", "::1"}

// RedisUsers are the ACL users of roles (queue.ACLCoord, ACLSupervisor,
// ACLRunner) on site's Redis, each with its password in passwords and
// only the keys and commands it needs (queue.ACLRules). A role without a
// password is an error.
func RedisUsers(site string, passwords map[string]string, roles ...string) ([]redisproc.User, error) {
	if err := CheckRoles(site, roles...); err != nil {
		return nil, err
	}
	var users []redisproc.User
	for _, role := range roles {
		rules := queue.ACLRules(role, site)
		pw := passwords[role]
		if pw == "" {
			return nil, fmt.Errorf("redis role %s has no password", role)
		}
		users = append(users, redisproc.User{Name: role, Password: pw, Rules: rules})
	}
	return users, nil
}

// CheckRoles says what is wrong with roles as the Redis users of site's
// Redis: a name that is no role, or a site's role without a site.
func CheckRoles(site string, roles ...string) error {
	for _, role := range roles {
		if queue.ACLRules(role, site) == "-@all" {
			return fmt.Errorf("redis role %q is not one of %s, %s, %s", role, queue.ACLCoord, queue.ACLSupervisor, queue.ACLRunner)
		}
		if role != queue.ACLCoord && site == "" {
			return fmt.Errorf("redis role %s needs a site (--site)", role)
		}
	}
	return nil
}

// Passwords makes a random password for each role.
func Passwords(roles ...string) map[string]string {
	out := make(map[string]string, len(roles))
	for _, r := range roles {
		out[r] = Secret()
	}
	return out
}

// Secret is 24 random bytes in hex: a password or token no one chose.
func Secret() string {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return hex.EncodeToString(b)
}

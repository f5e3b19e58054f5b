package pki

import (
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestCA_IssueAndMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca, err := InitCA(filepath.Join(dir, "ca"), "test-ca")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := InitCA(filepath.Join(dir, "ca"), "test-ca"); err == nil {
		t.Error("InitCA overwrote an existing CA")
	}
	if _, _, err := ca.Issue(Request{Name: "Bad Name"}); err == nil {
		t.Error("issued a certificate for an invalid name")
	}
	issue := func(ca *CA, name string) *Config {
		cert, key := filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
		if err := ca.IssueFiles(Request{Name: name, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}, cert, key); err != nil {
			t.Fatal(err)
		}
		return &Config{CA: filepath.Join(dir, "ca", CACertFile), Cert: cert, Key: key}
	}
	srvCfg, coordCfg := issue(ca, "supervisor"), issue(ca, "coord")
	for _, c := range []*Config{srvCfg, coordCfg} {
		if err := c.Load(); err != nil {
			t.Fatal(err)
		}
	}
	other, _ := InitCA(filepath.Join(dir, "other"), "other-ca")
	strangerCfg := issue(other, "stranger")
	if err := strangerCfg.Load(); err == nil || !strings.Contains(err.Error(), "not issued by the CA") {
		t.Errorf("a certificate of another CA loaded against ours: %v", err)
	}
	if err := (&Config{}).Load(); err == nil {
		t.Error("a config without a CA loaded")
	}

	hs := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "peer="+PeerName(r))
	}))
	hs.TLS = srvCfg.Server()
	hs.StartTLS()
	defer hs.Close()
	get := func(c *http.Client) (string, error) {
		resp, err := c.Get(hs.URL)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b), nil
	}
	if got, err := get(coordCfg.HTTPClient(5 * time.Second)); err != nil || got != "peer=coord" {
		t.Errorf("coord's client = %q, %v; want peer=coord", got, err)
	}
	client := &Config{CA: srvCfg.CA}
	client.Load()
	if got, err := get(client.HTTPClient(5 * time.Second)); err != nil || got != "peer=" {
		t.Errorf("a client without a certificate = %q, %v; want an anonymous peer", got, err)
	}
	// A client trusting another CA refuses the server.
	otherPool, _ := LoadPool(filepath.Join(dir, "other", CACertFile))
	oc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: otherPool}}}
	if _, err := get(oc); err == nil {
		t.Error("a client trusting another CA accepted the server")
	}
	// A client showing another CA's certificate is refused by the server
	// (forced: Go's client would otherwise send none, as the server asks
	// for certificates of its own CA only).
	pair, _ := tls.LoadX509KeyPair(strangerCfg.Cert, strangerCfg.Key)
	sc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: srvCfg.Pool(),
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &pair, nil }}}}
	if _, err := get(sc); err == nil {
		t.Error("the server accepted a client certificate of another CA")
	}
}

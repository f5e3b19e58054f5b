package ledger_test

import (
	"crypto"
	"crypto/tls"
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/pki"
)

// TestSignedTrust: a snapshot signed by the ledger's certificate opens
// against the CA alone (a cached or relayed copy too); a changed payload,
// another CA, a certificate not named "ledger", another site's snapshot, an
// old copy and an unsigned one are refused.
func TestSignedTrust(t *testing.T) {
	dir := t.TempDir()
	ca, _ := pki.InitCA(filepath.Join(dir, "ca"), "ca")
	other, _ := pki.InitCA(filepath.Join(dir, "other"), "other")
	signer := func(ca *pki.CA, name string) *ledger.TrustSigner {
		cert, key := filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
		if err := ca.IssueFiles(pki.Request{Name: name, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}, cert, key); err != nil {
			t.Fatal(err)
		}
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			t.Fatal(err)
		}
		return &ledger.TrustSigner{Key: pair.PrivateKey.(crypto.Signer), Cert: pair.Certificate[0]}
	}
	good := signer(ca, "ledger")
	pool, _ := pki.LoadPool(filepath.Join(dir, "ca", pki.CACertFile))
	v := &ledger.TrustVerifier{CA: pool}
	now := time.Now()
	snap := func(site string, at time.Time) *ledger.Trust {
		return &ledger.Trust{Site: ledger.Site{Name: site}, Signers: []ledger.Signer{}, AsOf: at}
	}
	st, err := good.Sign(snap("lab", now))
	if err != nil {
		t.Fatal(err)
	}
	// A copy that went through JSON (a cache, a relay) still opens.
	raw, _ := json.Marshal(st)
	var copy ledger.SignedTrust
	json.Unmarshal(raw, &copy)
	if tr, err := v.Open(&copy, "lab", now); err != nil || tr.Site.Name != "lab" {
		t.Fatalf("Open = %+v, %v", tr, err)
	}
	tampered := copy
	tampered.Payload = []byte(strings.Replace(string(copy.Payload), `"signers":[]`, `"signers":[{"key_id":"x"}]`, 1))
	old, _ := good.Sign(snap("lab", now.Add(-time.Hour)))
	byOther, _ := signer(other, "ledger").Sign(snap("lab", now))
	misnamed, _ := signer(ca, "coord").Sign(snap("lab", now))
	unsigned, _ := (*ledger.TrustSigner)(nil).Sign(snap("lab", now))
	for name, tc := range map[string]struct {
		st   *ledger.SignedTrust
		site string
		want string
	}{
		"tampered":       {&tampered, "lab", "does not verify"},
		"another site":   {&copy, "prod", "not \"prod\"'s"},
		"old copy":       {old, "lab", "old copy"},
		"another CA":     {byOther, "lab", "certificate"},
		"not the ledger": {misnamed, "lab", "not \"ledger\"'s"},
		"unsigned":       {unsigned, "lab", "not signed"},
	} {
		if _, err := v.Open(tc.st, tc.site, now); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", name, err, tc.want)
		}
	}
	// Without a CA (plain HTTP on one machine) an unsigned snapshot opens.
	if _, err := (*ledger.TrustVerifier)(nil).Open(unsigned, "lab", now); err != nil {
		t.Errorf("unsigned without a verifier: %v", err)
	}
}

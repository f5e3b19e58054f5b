package ledger

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/pki"
)

// TrustPayloadType is the DSSE payload type of a signed trust snapshot.
const TrustPayloadType = "application/vnd.writ.trust+json"

// DefaultLedgerName is the certificate name a ledger signs trust
// snapshots as, unless told otherwise.
const DefaultLedgerName = "ledger"

// MaxSnapshotAge bounds how old a signed snapshot's as_of may be when a
// verifier takes it, so a relayed old copy (from before a key was revoked)
// is refused.
const MaxSnapshotAge = 5 * time.Minute

// SignedTrust is what GET /v1/sites/{site}/trust answers: the snapshot
// (payload, the Trust JSON) signed over DSSE's PAE by the ledger's
// certificate key, with that certificate, so a cached or relayed copy can
// be checked against the CA alone. A ledger without a certificate (plain
// HTTP on one machine) leaves Signature and Certificate empty.
type SignedTrust struct {
	PayloadType string `json:"payload_type"`
	Payload     []byte `json:"payload"`
	Signature   []byte `json:"signature,omitempty"`
	Certificate []byte `json:"certificate,omitempty"` // DER
}

// TrustSigner signs snapshots with the ledger's certificate key.
type TrustSigner struct {
	Key  crypto.Signer
	Cert []byte // DER of the certificate whose key Key is
}

// Sign wraps t.
func (s *TrustSigner) Sign(t *Trust) (*SignedTrust, error) {
	payload, err := json.Marshal(t)
	if err != nil {
		return nil, err
	}
	st := &SignedTrust{PayloadType: TrustPayloadType, Payload: payload}
	if s == nil {
		return st, nil
	}
	sig, err := signPAE(s.Key, envelope.PAE(TrustPayloadType, payload))
	if err != nil {
		return nil, fmt.Errorf("sign trust snapshot: %w", err)
	}
	st.Signature, st.Certificate = sig, s.Cert
	return st, nil
}

func signPAE(key crypto.Signer, msg []byte) ([]byte, error) {
	if _, ok := key.Public().(ed25519.PublicKey); ok {
		return key.Sign(rand.Reader, msg, crypto.Hash(0))
	}
	sum := sha256.Sum256(msg)
	return key.Sign(rand.Reader, sum[:], crypto.SHA256)
}

// TrustVerifier checks signed snapshots: signed by a certificate the CA
// issued to Name, over a snapshot of the site asked for, not older than
// MaxSnapshotAge.
type TrustVerifier struct {
	CA   *x509.CertPool
	Name string // the ledger's certificate name; "" means DefaultLedgerName
}

// Open checks st (when v is not nil) and returns the snapshot, indexed.
// A nil verifier takes an unsigned snapshot (plain HTTP on one machine).
func (v *TrustVerifier) Open(st *SignedTrust, site string, now time.Time) (*Trust, error) {
	if st.PayloadType != TrustPayloadType {
		return nil, fmt.Errorf("trust snapshot has payload type %q, want %q", st.PayloadType, TrustPayloadType)
	}
	if v != nil {
		if len(st.Signature) == 0 || len(st.Certificate) == 0 {
			return nil, errors.New("trust snapshot is not signed (is the ledger serving plain HTTP?)")
		}
		name := v.Name
		if name == "" {
			name = DefaultLedgerName
		}
		cert, err := pki.VerifyLeaf(v.CA, st.Certificate, name, now)
		if err != nil {
			return nil, fmt.Errorf("trust snapshot's certificate: %w", err)
		}
		if err := verifyPAE(cert, envelope.PAE(TrustPayloadType, st.Payload), st.Signature); err != nil {
			return nil, err
		}
	}
	var t Trust
	if err := json.Unmarshal(st.Payload, &t); err != nil {
		return nil, fmt.Errorf("trust snapshot: %w", err)
	}
	if t.Site.Name != site {
		return nil, fmt.Errorf("trust snapshot is site %q's, not %q's", t.Site.Name, site)
	}
	if v != nil {
		if age := now.Sub(t.AsOf); age > MaxSnapshotAge || age < -MaxSnapshotAge {
			return nil, fmt.Errorf("trust snapshot is as of %s, more than %s from now: an old copy replayed, or a clock off", t.AsOf.UTC().Format(time.RFC3339), MaxSnapshotAge)
		}
	}
	if err := t.index(); err != nil {
		return nil, err
	}
	return &t, nil
}

func verifyPAE(cert *x509.Certificate, msg, sig []byte) error {
	switch pub := cert.PublicKey.(type) {
	case *ecdsa.PublicKey:
		sum := sha256.Sum256(msg)
		if ecdsa.VerifyASN1(pub, sum[:], sig) {
			return nil
		}
	case ed25519.PublicKey:
		if ed25519.Verify(pub, msg, sig) {
			return nil
		}
	default:
		return fmt.Errorf("trust snapshot signed with an unsupported key type %T", pub)
	}
	return errors.New("trust snapshot's signature does not verify")
}

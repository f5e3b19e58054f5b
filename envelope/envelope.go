// Package envelope is the signed form of a writ job: a DSSE envelope
// (https://github.com/secure-systems-lab/dsse, "Dead Simple Signing Envelope")
// whose payload is a JSON job (see Job) and whose payloadType is
// PayloadType.
//
// Signatures cover PAE(payloadType, payload), the exact payload bytes, so there
// is no canonicalization step to get wrong. An envelope may carry several
// signatures (k-of-n site policies); each key counts once. The key ID in a
// signature is an unauthenticated hint: Verify uses it only to pick candidate
// keys.
//
// A job's ID is the hex SHA-256 of the PAE bytes, so adding a signature does
// not change it and the same signed job submitted twice has the same ID.
//
// Decoding is strict and bounded (see the Max* constants): unknown fields,
// oversized parts and malformed base64 are errors that say what is wrong.
package envelope

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strconv"
)

// PayloadType is the DSSE payloadType of a writ job.
const PayloadType = "application/vnd.writ.job.v1+json"

// Limits on an envelope's parts.
const (
	// MaxEnvelopeBytes bounds the JSON envelope as submitted.
	MaxEnvelopeBytes = 1 << 20
	// MaxSignatures bounds the number of signatures on one envelope.
	MaxSignatures = 16
	// MaxKeyIDLen bounds one signature's key ID.
	MaxKeyIDLen = 256
)

// Signature is one DSSE signature.
type Signature struct {
	KeyID string
	Sig   []byte
}

// Envelope is a DSSE envelope.
type Envelope struct {
	PayloadType string
	Payload     []byte
	Signatures  []Signature
}

type wireSignature struct {
	KeyID string `json:"keyid"`
	Sig   string `json:"sig"`
}

type wireEnvelope struct {
	PayloadType string          `json:"payloadType"`
	Payload     string          `json:"payload"`
	Signatures  []wireSignature `json:"signatures"`
}

// PAE is DSSE's pre-authentication encoding, the bytes a signature covers:
// "DSSEv1" SP len(type) SP type SP len(payload) SP payload.
func PAE(payloadType string, payload []byte) []byte {
	var b bytes.Buffer
	b.Grow(len(payloadType) + len(payload) + 32)
	b.WriteString("DSSEv1 ")
	b.WriteString(strconv.Itoa(len(payloadType)))
	b.WriteByte(' ')
	b.WriteString(payloadType)
	b.WriteByte(' ')
	b.WriteString(strconv.Itoa(len(payload)))
	b.WriteByte(' ')
	b.Write(payload)
	return b.Bytes()
}

// New returns an unsigned envelope for payload.
func New(payloadType string, payload []byte) *Envelope {
	return &Envelope{PayloadType: payloadType, Payload: payload}
}

// ID returns the envelope's job ID: hex SHA-256 of its PAE bytes.
func (e *Envelope) ID() string {
	sum := sha256.Sum256(PAE(e.PayloadType, e.Payload))
	return hex.EncodeToString(sum[:])
}

// Sign adds a signature by priv under keyID. Signing twice with the same key
// ID replaces the earlier signature, so re-signing is idempotent.
func (e *Envelope) Sign(keyID string, priv ed25519.PrivateKey) {
	sig := ed25519.Sign(priv, PAE(e.PayloadType, e.Payload))
	for i := range e.Signatures {
		if e.Signatures[i].KeyID == keyID {
			e.Signatures[i].Sig = sig
			return
		}
	}
	e.Signatures = append(e.Signatures, Signature{KeyID: keyID, Sig: sig})
}

// MarshalJSON encodes the envelope in DSSE's JSON form (standard base64).
func (e *Envelope) MarshalJSON() ([]byte, error) {
	w := wireEnvelope{
		PayloadType: e.PayloadType,
		Payload:     base64.StdEncoding.EncodeToString(e.Payload),
		Signatures:  make([]wireSignature, len(e.Signatures)),
	}
	for i, s := range e.Signatures {
		w.Signatures[i] = wireSignature{KeyID: s.KeyID, Sig: base64.StdEncoding.EncodeToString(s.Sig)}
	}
	return json.Marshal(w)
}

// Decode parses a JSON envelope strictly: size-bounded, no unknown fields, no
// trailing data, base64 in either the standard or the URL-safe alphabet
// (DSSE requires accepting both), at most MaxSignatures signatures. It does
// not check payloadType or signatures.
func Decode(data []byte) (*Envelope, error) {
	if len(data) > MaxEnvelopeBytes {
		return nil, &Error{Reason: ReasonTooLarge, Msg: fmt.Sprintf("envelope is %d bytes, the limit is %d", len(data), MaxEnvelopeBytes)}
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var w wireEnvelope
	if err := dec.Decode(&w); err != nil {
		return nil, &Error{Reason: ReasonMalformed, Msg: "envelope is not valid DSSE JSON: " + err.Error()}
	}
	if dec.More() {
		return nil, &Error{Reason: ReasonMalformed, Msg: "envelope has trailing data after the JSON object"}
	}
	if w.PayloadType == "" {
		return nil, &Error{Reason: ReasonMalformed, Msg: "envelope has no payloadType"}
	}
	if len(w.Signatures) > MaxSignatures {
		return nil, &Error{Reason: ReasonTooLarge, Msg: fmt.Sprintf("envelope has %d signatures, the limit is %d", len(w.Signatures), MaxSignatures)}
	}
	payload, err := decodeBase64(w.Payload)
	if err != nil {
		return nil, &Error{Reason: ReasonMalformed, Msg: "envelope payload is not base64: " + err.Error()}
	}
	e := &Envelope{PayloadType: w.PayloadType, Payload: payload, Signatures: make([]Signature, 0, len(w.Signatures))}
	for i, s := range w.Signatures {
		if len(s.KeyID) > MaxKeyIDLen {
			return nil, &Error{Reason: ReasonMalformed, Msg: fmt.Sprintf("signature %d: key id is longer than %d bytes", i, MaxKeyIDLen)}
		}
		sig, err := decodeBase64(s.Sig)
		if err != nil {
			return nil, &Error{Reason: ReasonMalformed, Msg: fmt.Sprintf("signature %d: not base64: %v", i, err)}
		}
		e.Signatures = append(e.Signatures, Signature{KeyID: s.KeyID, Sig: sig})
	}
	return e, nil
}

// decodeBase64 accepts standard and URL-safe base64, padded or not.
func decodeBase64(s string) ([]byte, error) {
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding, base64.RawStdEncoding, base64.RawURLEncoding} {
		if b, err := enc.DecodeString(s); err == nil {
			return b, nil
		}
	}
	_, err := base64.StdEncoding.DecodeString(s)
	return nil, err
}

// TrustedKey is a public key a verifier accepts signatures from.
type TrustedKey struct {
	// ID is the key ID signatures name (writ uses the OpenSSH fingerprint).
	ID  string
	Key ed25519.PublicKey
}

// Verify returns the distinct trusted keys with a valid signature on the
// envelope, in signature order. A signature whose key ID names a trusted key
// is checked against that key; one with an empty or unmatched key ID is tried
// against every trusted key when there are at most MaxSignatures of them
// (the ID is only a hint). Bad signatures are skipped, not fatal: callers
// decide whether the keys returned meet their threshold. Each key counts once.
func (e *Envelope) Verify(trusted []TrustedKey) []TrustedKey {
	pae := PAE(e.PayloadType, e.Payload)
	var accepted []TrustedKey
	seen := make(map[string]bool)
	check := func(k TrustedKey, sig []byte) bool {
		if seen[string(k.Key)] || len(k.Key) != ed25519.PublicKeySize {
			return false
		}
		if ed25519.Verify(k.Key, pae, sig) {
			seen[string(k.Key)] = true
			accepted = append(accepted, k)
			return true
		}
		return false
	}
	for _, s := range e.Signatures {
		matched := false
		for _, k := range trusted {
			if s.KeyID != "" && k.ID == s.KeyID {
				matched = true
				check(k, s.Sig)
			}
		}
		if matched || len(trusted) > MaxSignatures {
			continue
		}
		for _, k := range trusted {
			if check(k, s.Sig) {
				break
			}
		}
	}
	return accepted
}

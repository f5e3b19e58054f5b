// Package envelope is the signed form of a writ job: a DSSE envelope
// (https://github.com/secure-systems-lab/dsse, "Dead Simple Signing Envelope")
// whose payload is a JSON job (see Job) and whose payloadType is
// PayloadType.
//
// Signatures cover PAE(payloadType, payload), the exact payload bytes, so there
// is no canonicalization step to get wrong. An envelope may carry several
// signatures (k-of-n site policies); each key counts once. The key ID in a
// signature is an unauthenticated hint: Signers uses it only to try a key
// first, and a signature with an empty or foreign key ID still verifies.
//
// A job's ID is the hex SHA-256 of the PAE bytes, so adding a signature does
// not change it and the same signed job submitted twice has the same ID.
//
// Decoding is bounded (see the Max* constants) and exact: oversized parts,
// malformed base64 and a member name given twice are errors that say what
// is wrong. The envelope ignores members DSSE does not define, as the spec
// says; the job payload is strict (see Envelope.Job).
package envelope

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"github.com/writ-fleet/writ/job"
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

// Decode parses a JSON envelope: size-bounded, exact member names, no
// name twice, no trailing data, base64 in either the standard or the
// URL-safe alphabet (DSSE requires accepting both), at most MaxSignatures
// signatures. Members DSSE does not define are ignored, at the top level
// and in signatures, as the spec tells consumers to. It does not check
// payloadType or signatures.
func Decode(data []byte) (*Envelope, error) {
	if len(data) > MaxEnvelopeBytes {
		return nil, &Error{Reason: job.ReasonTooLarge, Msg: fmt.Sprintf("envelope is %d bytes, the limit is %d", len(data), MaxEnvelopeBytes)}
	}
	malformed := func(msg string, err error) error {
		return &Error{Reason: job.ReasonMalformed, Msg: msg + ": " + err.Error()}
	}
	top, err := members(data, false)
	if err != nil {
		return nil, malformed("envelope is not valid DSSE JSON", err)
	}
	var w wireEnvelope
	if err := stringMember(top, "payloadType", &w.PayloadType); err != nil {
		return nil, malformed("envelope", err)
	}
	if err := stringMember(top, "payload", &w.Payload); err != nil {
		return nil, malformed("envelope", err)
	}
	if w.PayloadType == "" {
		return nil, &Error{Reason: job.ReasonMalformed, Msg: "envelope has no payloadType"}
	}
	var sigs []json.RawMessage
	if raw, ok := lookup(top, "signatures"); ok {
		if err := json.Unmarshal(raw, &sigs); err != nil {
			return nil, malformed("envelope signatures are not a JSON array", err)
		}
	}
	if len(sigs) > MaxSignatures {
		return nil, &Error{Reason: job.ReasonTooLarge, Msg: fmt.Sprintf("envelope has %d signatures, the limit is %d", len(sigs), MaxSignatures)}
	}
	payload, err := decodeBase64(w.Payload)
	if err != nil {
		return nil, malformed("envelope payload is not base64", err)
	}
	e := &Envelope{PayloadType: w.PayloadType, Payload: payload, Signatures: make([]Signature, 0, len(sigs))}
	for i, raw := range sigs {
		m, err := members(raw, false)
		if err != nil {
			return nil, malformed(fmt.Sprintf("signature %d", i), err)
		}
		var s wireSignature
		if err := stringMember(m, "keyid", &s.KeyID); err != nil {
			return nil, malformed(fmt.Sprintf("signature %d", i), err)
		}
		if err := stringMember(m, "sig", &s.Sig); err != nil {
			return nil, malformed(fmt.Sprintf("signature %d", i), err)
		}
		if len(s.KeyID) > MaxKeyIDLen {
			return nil, &Error{Reason: job.ReasonMalformed, Msg: fmt.Sprintf("signature %d: key id is longer than %d bytes", i, MaxKeyIDLen)}
		}
		sig, err := decodeBase64(s.Sig)
		if err != nil {
			return nil, &Error{Reason: job.ReasonMalformed, Msg: fmt.Sprintf("signature %d: not base64: %v", i, err)}
		}
		e.Signatures = append(e.Signatures, Signature{KeyID: s.KeyID, Sig: sig})
	}
	return e, nil
}

// stringMember sets *dst to the string member name of obj, if present.
func stringMember(obj []member, name string, dst *string) error {
	raw, ok := lookup(obj, name)
	if !ok {
		return nil
	}
	if plain, ok := plainString(raw); ok {
		*dst = plain
		return nil
	}
	if err := json.Unmarshal(raw, dst); err != nil {
		return fmt.Errorf("%s is not a string", name)
	}
	return nil
}

// plainString returns the contents of a JSON string with no escapes and
// no bytes that need them, which is every base64 payload and signature:
// for those json.Unmarshal's full scan and unquoting (a third of Decode's
// time on a job's payload) give the same answer. Anything else (escapes,
// control or non-ASCII bytes, not a string) is left to json.Unmarshal.
func plainString(raw []byte) (string, bool) {
	if len(raw) < 2 || raw[0] != '"' || raw[len(raw)-1] != '"' {
		return "", false
	}
	body := raw[1 : len(raw)-1]
	for _, c := range body {
		if c < 0x20 || c >= 0x80 || c == '"' || c == '\\' {
			return "", false
		}
	}
	return string(body), true
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

// Signers reports, for each signature, the index in keys of the key that
// made it, or -1 when none did. The key ID is a hint, not a claim (DSSE:
// it must not decide anything): a key whose ID matches is tried first, then
// every other key, so a signature with an empty or foreign key ID still
// counts. The work is bounded: at most len(keys) verifications per distinct
// signature, and Decode caps signatures at MaxSignatures.
func (e *Envelope) Signers(keys []TrustedKey) []int {
	pae := PAE(e.PayloadType, e.Payload)
	digest := sha256.Sum256(pae)
	out := make([]int, len(e.Signatures))
	done := map[string]int{} // signature bytes already resolved
	for i, s := range e.Signatures {
		if j, ok := done[string(s.Sig)]; ok {
			out[i] = j
			continue
		}
		out[i] = -1
		ok := func(j int) bool {
			k := keys[j]
			return verified.verify(k.Key, pae, &digest, s.Sig)
		}
		hinted := -1
		for j, k := range keys {
			if s.KeyID != "" && k.ID == s.KeyID {
				hinted = j
				break
			}
		}
		if hinted >= 0 && ok(hinted) {
			out[i] = hinted
		} else {
			for j := range keys {
				if j != hinted && ok(j) {
					out[i] = j
					break
				}
			}
		}
		done[string(s.Sig)] = out[i]
	}
	return out
}

// Verify returns the distinct trusted keys with a valid signature on the
// envelope, in signature order (see Signers for how key IDs are used). Bad
// signatures are skipped, not fatal: callers decide whether the keys
// returned meet their threshold. Each key counts once.
func (e *Envelope) Verify(trusted []TrustedKey) []TrustedKey {
	var accepted []TrustedKey
	seen := make(map[string]bool)
	for _, j := range e.Signers(trusted) {
		if j < 0 || seen[string(trusted[j].Key)] {
			continue
		}
		seen[string(trusted[j].Key)] = true
		accepted = append(accepted, trusted[j])
	}
	return accepted
}

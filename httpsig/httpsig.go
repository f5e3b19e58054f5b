// Package httpsig signs and verifies HTTP requests with RFC 9421 HTTP Message
// Signatures (algorithm ed25519) and RFC 9530 Content-Digest.
//
// It implements the subset writ needs: derived components @method,
// @authority, @path, @query and @target-uri, header fields, and the
// signature parameters created, expires, keyid, alg and nonce. Requests are
// signed as label "writ" over @method, @authority, @path, @query and, when
// there is a body, content-digest. The RFC's own ed25519 example (Appendix
// B.2.6, in testdata/) is the check that this is the standard.
//
// No RFC 9421 library is available to writ's build, hence this package.
package httpsig

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Label is the signature label writ uses.
const Label = "writ"

// DefaultComponents are the components a writ request signature covers;
// content-digest is added when the request has a body.
var DefaultComponents = []string{"@method", "@authority", "@path", "@query"}

// Params are a signature's parameters.
type Params struct {
	Created time.Time
	Expires time.Time // zero: none
	KeyID   string
	Alg     string
	Nonce   string
}

// Signed is a parsed, not yet verified, signature.
type Signed struct {
	Label      string
	Components []string
	Params     Params
	Sig        []byte
	// paramsOrder preserves the order of the parameters as sent, which the
	// signature base must reproduce.
	paramsOrder []string
}

// ContentDigest returns the RFC 9530 Content-Digest field value for body
// using sha-256.
func ContentDigest(body []byte) string {
	sum := sha256.Sum256(body)
	return "sha-256=:" + base64.StdEncoding.EncodeToString(sum[:]) + ":"
}

// MaxDigestFieldBytes bounds the Content-Digest field: one sha-256 and
// one sha-512 member are some 140 bytes. A longer field (a member given
// thousands of times, each a hash of the whole body to compute) is
// refused before anything is hashed.
const MaxDigestFieldBytes = 512

// checkDigestField refuses a Content-Digest field that is too long, given
// more than once, or names an algorithm twice, without hashing anything.
func checkDigestField(values []string) error {
	if len(values) > 1 {
		return errors.New("content-digest is given more than once")
	}
	if len(values) == 0 {
		return nil // CheckContentDigest says it is missing
	}
	field := values[0]
	if len(field) > MaxDigestFieldBytes {
		return fmt.Errorf("content-digest is longer than %d bytes", MaxDigestFieldBytes)
	}
	seen := map[string]bool{}
	for _, member := range splitTopLevel(field, ',') {
		name, _, _ := strings.Cut(strings.TrimSpace(member), "=")
		name = strings.TrimSpace(name)
		if seen[name] {
			return fmt.Errorf("content-digest names %s more than once", name)
		}
		seen[name] = true
	}
	return nil
}

// CheckContentDigest verifies a Content-Digest field value against body. At
// least one sha-256 or sha-512 member must be present and every such member
// must match. The field is bounded (MaxDigestFieldBytes) and may name each
// algorithm once, so body is hashed at most once per algorithm.
func CheckContentDigest(field string, body []byte) error {
	if err := checkDigestField([]string{field}); err != nil {
		return err
	}
	checked := 0
	for _, member := range splitTopLevel(field, ',') {
		member = strings.TrimSpace(member)
		name, value, ok := strings.Cut(member, "=")
		if !ok {
			return fmt.Errorf("content-digest: malformed member %q", member)
		}
		var sum []byte
		switch strings.TrimSpace(name) {
		case "sha-256":
			s := sha256.Sum256(body)
			sum = s[:]
		case "sha-512":
			s := sha512.Sum512(body)
			sum = s[:]
		default:
			continue
		}
		got, err := parseByteSeq(strings.TrimSpace(value))
		if err != nil {
			return fmt.Errorf("content-digest: %w", err)
		}
		if !bytes.Equal(got, sum) {
			return errors.New("content-digest does not match the body")
		}
		checked++
	}
	if checked == 0 {
		return errors.New("content-digest has no sha-256 or sha-512 member")
	}
	return nil
}

// component returns the value of one covered component of r.
func component(r *http.Request, name string) (string, error) {
	switch name {
	case "@method":
		return r.Method, nil
	case "@authority":
		host := r.Host
		if host == "" && r.URL != nil {
			host = r.URL.Host
		}
		return strings.ToLower(host), nil
	case "@path":
		p := r.URL.EscapedPath()
		if p == "" {
			p = "/"
		}
		return p, nil
	case "@query":
		return "?" + r.URL.RawQuery, nil
	case "@target-uri":
		scheme := "http"
		if r.TLS != nil || r.URL.Scheme == "https" {
			scheme = "https"
		}
		host, _ := component(r, "@authority")
		return scheme + "://" + host + r.URL.RequestURI(), nil
	}
	if strings.HasPrefix(name, "@") {
		return "", fmt.Errorf("unsupported derived component %q", name)
	}
	vals := r.Header.Values(name)
	if len(vals) == 0 {
		return "", fmt.Errorf("covered header field %q is missing", name)
	}
	for i := range vals {
		vals[i] = strings.TrimSpace(vals[i])
	}
	return strings.Join(vals, ", "), nil
}

// serializeParams renders the @signature-params value: the inner list of
// components followed by the parameters in order.
func serializeParams(components []string, p Params, order []string) string {
	var b strings.Builder
	b.WriteByte('(')
	for i, c := range components {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(strconv.Quote(c))
	}
	b.WriteByte(')')
	for _, name := range order {
		switch name {
		case "created":
			b.WriteString(";created=" + strconv.FormatInt(p.Created.Unix(), 10))
		case "expires":
			b.WriteString(";expires=" + strconv.FormatInt(p.Expires.Unix(), 10))
		case "keyid":
			b.WriteString(";keyid=" + strconv.Quote(p.KeyID))
		case "alg":
			b.WriteString(";alg=" + strconv.Quote(p.Alg))
		case "nonce":
			b.WriteString(";nonce=" + strconv.Quote(p.Nonce))
		}
	}
	return b.String()
}

// Base returns the RFC 9421 signature base for r covering components with the
// given parameters (in the given order).
func Base(r *http.Request, components []string, p Params, order []string) ([]byte, error) {
	var b bytes.Buffer
	seen := map[string]bool{}
	for _, c := range components {
		if seen[c] {
			return nil, fmt.Errorf("component %q is covered twice", c)
		}
		seen[c] = true
		v, err := component(r, c)
		if err != nil {
			return nil, err
		}
		if strings.ContainsAny(v, "\r\n") {
			return nil, fmt.Errorf("component %q holds a line break", c)
		}
		b.WriteString(strconv.Quote(c))
		b.WriteString(": ")
		b.WriteString(v)
		b.WriteByte('\n')
	}
	b.WriteString(`"@signature-params": `)
	b.WriteString(serializeParams(components, p, order))
	return b.Bytes(), nil
}

// Sign signs r (whose body is body, possibly nil) with priv under keyID at
// time now: it sets Content-Digest when there is a body, then Signature-Input
// and Signature with label Label, a fresh nonce and alg "ed25519".
func Sign(r *http.Request, body []byte, keyID string, priv ed25519.PrivateKey, now time.Time) error {
	comps := append([]string(nil), DefaultComponents...)
	if len(body) > 0 {
		r.Header.Set("Content-Digest", ContentDigest(body))
		comps = append(comps, "content-digest")
	}
	var nonce [12]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return fmt.Errorf("sign request: %w", err)
	}
	p := Params{Created: now, KeyID: keyID, Alg: "ed25519", Nonce: hex.EncodeToString(nonce[:])}
	order := []string{"created", "keyid", "alg", "nonce"}
	base, err := Base(r, comps, p, order)
	if err != nil {
		return fmt.Errorf("sign request: %w", err)
	}
	sig := ed25519.Sign(priv, base)
	r.Header.Set("Signature-Input", Label+"="+serializeParams(comps, p, order))
	r.Header.Set("Signature", Label+"=:"+base64.StdEncoding.EncodeToString(sig)+":")
	return nil
}

// Bounds of what a signature may carry: a stranger's request is parsed
// before anyone knows who sent it, and a nonce is kept until it expires.
const (
	MaxFieldBytes  = 4096 // Signature-Input and Signature, each, all values joined
	MaxComponents  = 16
	MaxKeyIDBytes  = 128
	MaxNonceBytes  = 64
	MaxAlgBytes    = 32
	MaxSignatureSz = 512
)

// Parse reads the signature with the given label (or the only one, when
// label is "") from r's Signature-Input and Signature fields.
func Parse(r *http.Request, label string) (*Signed, error) {
	inputs := r.Header.Values("Signature-Input")
	sigs := r.Header.Values("Signature")
	if len(inputs) == 0 || len(sigs) == 0 {
		return nil, errors.New("request is not signed (no Signature-Input / Signature fields)")
	}
	if fieldLen(inputs) > MaxFieldBytes || fieldLen(sigs) > MaxFieldBytes {
		return nil, fmt.Errorf("signature fields are longer than %d bytes", MaxFieldBytes)
	}
	inMembers, err := parseDict(strings.Join(inputs, ", "))
	if err != nil {
		return nil, fmt.Errorf("signature-input: %w", err)
	}
	sigMembers, err := parseDict(strings.Join(sigs, ", "))
	if err != nil {
		return nil, fmt.Errorf("signature: %w", err)
	}
	if label == "" {
		if len(inMembers) != 1 {
			return nil, fmt.Errorf("signature-input has %d signatures; name the label", len(inMembers))
		}
		for l := range inMembers {
			label = l
		}
	}
	in, ok := inMembers[label]
	if !ok {
		return nil, fmt.Errorf("no signature labelled %q", label)
	}
	sv, ok := sigMembers[label]
	if !ok {
		return nil, fmt.Errorf("signature-input %q has no matching signature", label)
	}
	s := &Signed{Label: label}
	if s.Components, s.Params, s.paramsOrder, err = parseInnerList(in); err != nil {
		return nil, fmt.Errorf("signature-input %q: %w", label, err)
	}
	if s.Sig, err = parseByteSeq(sv); err != nil {
		return nil, fmt.Errorf("signature %q: %w", label, err)
	}
	switch {
	case len(s.Components) > MaxComponents:
		return nil, fmt.Errorf("signature covers %d components, more than %d", len(s.Components), MaxComponents)
	case len(s.Params.KeyID) > MaxKeyIDBytes:
		return nil, fmt.Errorf("keyid is longer than %d bytes", MaxKeyIDBytes)
	case len(s.Params.Nonce) > MaxNonceBytes:
		return nil, fmt.Errorf("nonce is longer than %d bytes", MaxNonceBytes)
	case len(s.Params.Alg) > MaxAlgBytes:
		return nil, fmt.Errorf("alg is longer than %d bytes", MaxAlgBytes)
	case len(s.Sig) > MaxSignatureSz:
		return nil, fmt.Errorf("signature is longer than %d bytes", MaxSignatureSz)
	}
	return s, nil
}

func fieldLen(vals []string) int {
	n := 0
	for _, v := range vals {
		n += len(v) + 2
	}
	return n
}

// Verify checks s over r with pub. It does not check freshness or coverage;
// Verifier does.
func (s *Signed) Verify(r *http.Request, pub ed25519.PublicKey) error {
	if s.Params.Alg != "" && s.Params.Alg != "ed25519" {
		return fmt.Errorf("signature algorithm %q is not supported (want ed25519)", s.Params.Alg)
	}
	base, err := Base(r, s.Components, s.Params, s.paramsOrder)
	if err != nil {
		return err
	}
	if len(pub) != ed25519.PublicKeySize || !ed25519.Verify(pub, base, s.Sig) {
		return errors.New("signature does not verify")
	}
	return nil
}

// Covers reports whether the signature covers component c.
func (s *Signed) Covers(c string) bool {
	for _, x := range s.Components {
		if x == c {
			return true
		}
	}
	return false
}

// ReadBody reads up to limit bytes of r's body and replaces it with a reader
// over the bytes read, so handlers can read it again.
func ReadBody(r *http.Request, limit int64) ([]byte, error) {
	if r.Body == nil {
		return nil, nil
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	r.Body.Close()
	if err != nil {
		return nil, fmt.Errorf("read body: %w", err)
	}
	if int64(len(body)) > limit {
		return nil, fmt.Errorf("body is larger than %d bytes", limit)
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	return body, nil
}

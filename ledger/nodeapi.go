package ledger

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/httpsig"
	"github.com/writ-fleet/writ/internal/httpapi"
	"github.com/writ-fleet/writ/keys"
)

// Node-facing limits.
const (
	// maxNodeBody bounds registration and uptime bodies.
	maxNodeBody = 64 << 10
	// ReportWindow is how far an uptime report's time may be from the
	// ledger's clock.
	ReportWindow = 2 * time.Minute
	// MaxQueuedAge is how old a queued uptime report may be: one a node
	// kept through a ledger outage, or through its own downtime.
	MaxQueuedAge = 7 * 24 * time.Hour
	// DefaultTokenTTL is how long an enrollment token lives by default:
	// long enough to boot a batch of machines, short enough that a lost
	// one is soon worthless.
	DefaultTokenTTL = time.Hour
	// MaxTokenTTL bounds a token's life.
	MaxTokenTTL = 30 * 24 * time.Hour
	// nodeKeyCacheTTL bounds how long a node's key stays cached.
	nodeKeyCacheTTL = time.Minute
)

// RegisterRequest is the body of POST /v1/nodes/register, signed (RFC
// 9421) by the node's own key with the node ID as keyid.
type RegisterRequest struct {
	Site      string   `json:"site"`
	Token     string   `json:"token"`
	PublicKey string   `json:"public_key"` // authorized_keys line
	Facts     Facts    `json:"facts"`
	Capacity  Capacity `json:"capacity"`
}

// UptimeReply answers an uptime report.
type UptimeReply struct {
	Restarted bool   `json:"restarted"`
	Boots     int64  `json:"boots"`
	Liveness  string `json:"liveness"`
	// Interval is how often the site wants reports, in seconds.
	Interval Seconds `json:"interval"`
}

// regKey carries a registering node's public key from the handler to the
// signature check.
type regKey struct{}

// nodeKeys caches node public keys and site intervals for uptime reports
// (100,000 nodes report every minute).
type nodeKeys struct {
	mu    sync.Mutex
	nodes map[string]nodeKeyEntry // guarded by mu
}

type nodeKeyEntry struct {
	pub      ed25519.PublicKey
	site     string
	interval time.Duration
	at       time.Time
}

// nodeKey resolves the signer of a node request: the registering node's
// key (from the body) for registration, else a registered node's key.
func (s *Server) nodeKey(ctx context.Context, keyID string) (ed25519.PublicKey, string, error) {
	if pub, ok := ctx.Value(regKey{}).(ed25519.PublicKey); ok {
		if NodeID(pub) != keyID {
			return nil, "", fmt.Errorf("keyid %s is not the ID of the key in the body (%s)", keyID, NodeID(pub))
		}
		return pub, keyID, nil
	}
	e, err := s.lookupNode(ctx, keyID)
	if err != nil {
		return nil, "", err
	}
	return e.pub, keyID, nil
}

func (s *Server) lookupNode(ctx context.Context, id string) (nodeKeyEntry, error) {
	s.nkeys.mu.Lock()
	e, ok := s.nkeys.nodes[id]
	s.nkeys.mu.Unlock()
	if ok && s.now().Sub(e.at) < nodeKeyCacheTTL {
		return e, nil
	}
	n, err := s.store.GetNode(ctx, id)
	if err != nil {
		return nodeKeyEntry{}, errors.New("unknown node")
	}
	if n.RevokedAt != nil {
		return nodeKeyEntry{}, fmt.Errorf("node is revoked (since %s)", n.RevokedAt.UTC().Format(time.RFC3339))
	}
	pub, _, err := keys.ParsePublic(n.PublicKey)
	if err != nil {
		return nodeKeyEntry{}, err
	}
	site, err := s.store.GetSite(ctx, n.Site)
	if err != nil {
		return nodeKeyEntry{}, err
	}
	e = nodeKeyEntry{pub: pub, site: n.Site, interval: site.Interval(), at: s.now()}
	s.nkeys.mu.Lock()
	if s.nkeys.nodes == nil {
		s.nkeys.nodes = map[string]nodeKeyEntry{}
	}
	s.nkeys.nodes[id] = e
	s.nkeys.mu.Unlock()
	return e, nil
}

func hashSecret(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:])
}

// register handles POST /v1/nodes/register: a node proves possession of
// its key (the request is signed by it) and presents a live enrollment
// token of the site. Registering again with the same key updates facts and
// capacity; a key registered to one site never moves to another.
func (s *Server) register(w http.ResponseWriter, r *http.Request) {
	// Anyone can reach this: every attempt from a source counts against
	// its rate, and nothing is kept before the token is good.
	if !s.limits.allow(limitRegister, r) {
		httpapi.Fail(w, tooMany("registration"))
		return
	}
	// httpsig.ReadBody puts the body back, so the signature check below
	// reads the same bytes and checks their digest before any is used.
	body, err := httpsig.ReadBody(r, maxNodeBody)
	if err != nil {
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusRequestEntityTooLarge, Reason: "too_large", Msg: err.Error()})
		return
	}
	var req RegisterRequest
	if err := httpapi.DecodeJSON(body, &req); err != nil {
		httpapi.Fail(w, err)
		return
	}
	pub, comment, err := keys.ParsePublic(req.PublicKey)
	if err != nil {
		httpapi.Fail(w, badRequest("public_key: %v", err))
		return
	}
	r = r.WithContext(context.WithValue(r.Context(), regKey{}, pub))
	checked, err := s.regVerifier.Check(r)
	if err != nil {
		httpapi.Fail(w, sigErr(err))
		return
	}
	if !envelope.ValidSite(req.Site) {
		httpapi.Fail(w, badRequest("site %q is invalid", req.Site))
		return
	}
	ctx := r.Context()
	now := s.now()
	n := Node{ID: NodeID(pub), Site: req.Site, PublicKey: keys.FormatPublic(pub, comment), Facts: req.Facts, Capacity: req.Capacity, RegisteredAt: now}
	// A registered node registering again (at every start) proves itself
	// with its key alone: it needs no token, and uses none.
	if known, err := s.store.GetNode(ctx, n.ID); err == nil {
		if known.RevokedAt != nil {
			httpapi.Fail(w, &httpapi.Error{Status: http.StatusForbidden, Reason: "node_revoked", Msg: "node " + n.ID + " is revoked: it never comes back (give the machine a new key and a new token)"})
			return
		}
		if err := s.regVerifier.Commit(ctx, checked); err != nil {
			httpapi.Fail(w, sigErr(err))
			return
		}
		s.finishRegister(w, r, n, "")
		return
	}
	tok, err := s.store.TokenBySecret(ctx, hashSecret(req.Token))
	switch {
	case err != nil && !errors.Is(err, ErrNotFound):
		// The store failed (PostgreSQL busy or away): the node tries
		// again; its token is not judged.
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusServiceUnavailable, Reason: "unavailable", Msg: "the ledger's store did not answer; try again"})
		s.log.Warn("read enrollment token", "err", err)
		return
	case err != nil || tok.Site != req.Site:
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusForbidden, Reason: "bad_token", Msg: "enrollment token is not one of site " + req.Site})
		return
	case tok.RevokedAt != nil:
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusForbidden, Reason: "bad_token", Msg: "enrollment token " + tok.ID + " is revoked"})
		return
	case !now.Before(tok.ExpiresAt):
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusForbidden, Reason: "bad_token", Msg: "enrollment token " + tok.ID + " expired at " + tok.ExpiresAt.Format(time.RFC3339)})
		return
	case !tok.Live(now):
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusForbidden, Reason: "bad_token", Msg: fmt.Sprintf("enrollment token %s is used up (%d of %d nodes)", tok.ID, tok.Uses, tok.MaxUses)})
		return
	}
	if _, err := s.store.GetSite(ctx, req.Site); err != nil {
		httpapi.Fail(w, storeErr(err))
		return
	}
	// The token is good: now the nonce is kept (a replay of this very
	// request is refused, by every ledger on the store).
	if err := s.regVerifier.Commit(ctx, checked); err != nil {
		httpapi.Fail(w, sigErr(err))
		return
	}
	s.finishRegister(w, r, n, tok.ID)
}

// finishRegister stores n (a new one using a use of token) and answers.
func (s *Server) finishRegister(w http.ResponseWriter, r *http.Request, n Node, token string) {
	ctx := r.Context()
	created, err := s.store.RegisterNode(ctx, n, token)
	if errors.Is(err, ErrTokenUsedUp) {
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusForbidden, Reason: "bad_token", Msg: "enrollment token " + token + " is used up"})
		return
	}
	if errors.Is(err, ErrNodeRevoked) {
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusForbidden, Reason: "node_revoked", Msg: err.Error()})
		return
	}
	if err != nil {
		httpapi.Fail(w, storeErr(err))
		return
	}
	got, err := s.store.GetNode(ctx, n.ID)
	if err != nil {
		httpapi.Fail(w, storeErr(err))
		return
	}
	s.setLiveness(ctx, got)
	if created {
		s.audit(ctx, n.ID, "register_node", n.ID, "site "+n.Site+" with token "+token)
		s.log.Info("node registered", "node", n.ID, "site", n.Site, "token", token, "hostname", n.Facts.Hostname)
	}
	status := http.StatusOK
	if created {
		status = http.StatusCreated
	}
	httpapi.JSON(w, status, got)
}

// uptime handles POST /v1/nodes/{id}/uptime, signed by the node.
func (s *Server) uptime(w http.ResponseWriter, r *http.Request) {
	if !s.limits.ok(limitNode, r) {
		httpapi.Fail(w, tooMany("node request"))
		return
	}
	_, keyID, err := s.nodeVerifier.Verify(r)
	if err != nil {
		s.limits.allow(limitNode, r) // failures count against the source
		httpapi.Fail(w, sigErr(err))
		return
	}
	id := chi.URLParam(r, "id")
	if keyID != id {
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusForbidden, Reason: "forbidden", Msg: "node " + keyID + " may not report for node " + id})
		return
	}
	body, err := httpapi.ReadBody(r, maxNodeBody)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	var u Uptime
	if err := httpapi.DecodeJSON(body, &u); err != nil {
		httpapi.Fail(w, err)
		return
	}
	now := s.now()
	// The past bound is wider for a queued report; the time must still
	// move forward (the store refuses a report older than the last), so a
	// queued report cannot be replayed either.
	past := ReportWindow
	if u.Queued {
		past = MaxQueuedAge
	}
	if d := now.Sub(u.At); d > past || d < -ReportWindow {
		httpapi.Fail(w, badRequest("report time %s is more than %s behind or %s ahead of the ledger's %s (check the node's clock)", u.At.Format(time.RFC3339), past, ReportWindow, now.Format(time.RFC3339)))
		return
	}
	if u.BootID == "" || len(u.BootID) > 64 || u.UptimeSeconds < 0 {
		httpapi.Fail(w, badRequest("boot_id (1-64 characters) and a non-negative uptime_seconds are required"))
		return
	}
	restarted, boots, err := s.store.ReportUptime(r.Context(), id, u)
	if err != nil {
		httpapi.Fail(w, storeErr(err))
		return
	}
	if restarted {
		s.log.Info("node restarted", "node", id, "boot", u.BootID)
	}
	// The signature check looked the node up; this is a cache hit.
	e, err := s.lookupNode(r.Context(), id)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	n := Node{LastReport: u.At}
	n.SetLiveness(now, e.interval)
	httpapi.JSON(w, http.StatusOK, UptimeReply{Restarted: restarted, Boots: boots, Liveness: n.Liveness, Interval: Seconds(e.interval / time.Second)})
}

func sigErr(err error) error {
	var he *httpsig.Error
	if errors.As(err, &he) {
		return &httpapi.Error{Status: he.Status, Reason: "bad_signature", Msg: he.Msg}
	}
	return err
}

func (s *Server) setLiveness(ctx context.Context, n *Node) {
	interval := DefaultUptimeInterval
	if site, err := s.store.GetSite(ctx, n.Site); err == nil {
		interval = site.Interval()
	}
	n.SetLiveness(s.now(), interval)
}

func (s *Server) listNodes(w http.ResponseWriter, r *http.Request) {
	nodes, err := s.store.ListNodes(r.Context(), r.URL.Query().Get("site"))
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	intervals := map[string]time.Duration{}
	for i := range nodes {
		iv, ok := intervals[nodes[i].Site]
		if !ok {
			iv = DefaultUptimeInterval
			if site, err := s.store.GetSite(r.Context(), nodes[i].Site); err == nil {
				iv = site.Interval()
			}
			intervals[nodes[i].Site] = iv
		}
		nodes[i].SetLiveness(s.now(), iv)
	}
	httpapi.JSON(w, http.StatusOK, nodes)
}

func (s *Server) getNode(w http.ResponseWriter, r *http.Request) {
	n, err := s.store.GetNode(r.Context(), chi.URLParam(r, "id"))
	if err != nil {
		httpapi.Fail(w, storeErr(err))
		return
	}
	s.setLiveness(r.Context(), n)
	httpapi.JSON(w, http.StatusOK, n)
}

// CreateTokenRequest is the body of POST /v1/sites/{site}/tokens.
type CreateTokenRequest struct {
	// TTL is the token's life in seconds; zero means DefaultTokenTTL.
	TTL Seconds `json:"ttl"`
	// Uses is how many nodes it may enroll; zero means 1.
	Uses int64 `json:"uses"`
}

// MaxTokenUses bounds a token's uses.
const MaxTokenUses = 10000

func (s *Server) createToken(r *http.Request, body []byte) (any, error) {
	var req CreateTokenRequest
	if len(body) > 0 {
		if err := httpapi.DecodeJSON(body, &req); err != nil {
			return nil, err
		}
	}
	site := chi.URLParam(r, "site")
	if _, err := s.store.GetSite(r.Context(), site); err != nil {
		return nil, err
	}
	ttl := req.TTL.Duration()
	if ttl == 0 {
		ttl = DefaultTokenTTL
	}
	if ttl < 0 || ttl > MaxTokenTTL {
		return nil, badRequest("ttl must be between 1 s and %s", MaxTokenTTL)
	}
	uses := req.Uses
	if uses == 0 {
		uses = 1
	}
	if uses < 0 || uses > MaxTokenUses {
		return nil, badRequest("uses must be between 1 and %d", MaxTokenUses)
	}
	var id, secret [16]byte
	rand.Read(id[:8])
	rand.Read(secret[:])
	now := s.now().UTC()
	t := Token{ID: "tok-" + hex.EncodeToString(id[:8]), Site: site, CreatedBy: httpsig.Principal(r.Context()), CreatedAt: now, ExpiresAt: now.Add(ttl), MaxUses: uses}
	t.Secret = "writ-enroll-" + hex.EncodeToString(secret[:])
	if err := s.store.CreateToken(r.Context(), t, hashSecret(t.Secret)); err != nil {
		return nil, err
	}
	return t, nil // the only time the secret is shown
}

func (s *Server) listTokens(w http.ResponseWriter, r *http.Request) {
	list, err := s.store.ListTokens(r.Context(), chi.URLParam(r, "site"))
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	httpapi.JSON(w, http.StatusOK, list)
}

// revokeNode handles POST /v1/nodes/{id}/revoke: the node may not
// register or report again, placement passes it over, and its runner stops
// taking work once its trust snapshot says so (within the trust TTL).
func (s *Server) revokeNode(r *http.Request, _ []byte) (any, error) {
	id := chi.URLParam(r, "id")
	if err := s.store.RevokeNode(r.Context(), id, s.now()); err != nil {
		return nil, err
	}
	s.nkeys.mu.Lock()
	delete(s.nkeys.nodes, id)
	s.nkeys.mu.Unlock()
	n, err := s.store.GetNode(r.Context(), id)
	if err != nil {
		return nil, err
	}
	s.setLiveness(r.Context(), n)
	return n, nil
}

func (s *Server) revokeToken(r *http.Request, _ []byte) (any, error) {
	id := chi.URLParam(r, "id")
	if err := s.store.RevokeToken(r.Context(), id, s.now()); err != nil {
		return nil, err
	}
	list, err := s.store.ListTokens(r.Context(), chi.URLParam(r, "site"))
	if err != nil {
		return nil, err
	}
	for _, t := range list {
		if t.ID == id {
			return t, nil
		}
	}
	return nil, fmt.Errorf("token %s of site %s: %w", id, chi.URLParam(r, "site"), ErrNotFound)
}

// audit records an entry; a failure is logged, not returned (the write it
// records has happened).
func (s *Server) audit(ctx context.Context, actor, op, target, detail string) {
	if len(detail) > 300 {
		detail = detail[:300] + "…"
	}
	if err := s.store.AddAudit(ctx, AuditEntry{At: s.now().UTC(), Actor: actor, Op: op, Target: target, Detail: detail}); err != nil {
		s.log.Error("audit entry lost", "op", op, "err", err)
	}
}

func (s *Server) listAudit(w http.ResponseWriter, r *http.Request) {
	list, err := s.store.ListAudit(r.Context(), 200)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	httpapi.JSON(w, http.StatusOK, list)
}

// rotateKey adds a new key and revokes the old one in one admin call.
func (s *Server) rotateKey(r *http.Request, body []byte) (any, error) {
	var req struct {
		OldKeyID  string `json:"old_key_id"`
		PublicKey string `json:"public_key"`
	}
	if err := httpapi.DecodeJSON(body, &req); err != nil {
		return nil, err
	}
	name := chi.URLParam(r, "name")
	old, err := s.store.GetKey(r.Context(), req.OldKeyID)
	if err != nil {
		return nil, err
	}
	if old.User != name {
		return nil, badRequest("key %s belongs to %s, not %s", req.OldKeyID, old.User, name)
	}
	k, err := NewKey(name, req.PublicKey)
	if err != nil {
		return nil, err
	}
	k.CreatedAt = s.now()
	if err := s.store.AddKey(r.Context(), k); err != nil {
		return nil, err
	}
	if err := s.store.RevokeKey(r.Context(), req.OldKeyID, s.now()); err != nil {
		return nil, err
	}
	return s.store.GetUser(r.Context(), name)
}

// auditDetail is the request as the audit log keeps it: the body, without
// anything that looks like a secret.
func auditDetail(body []byte) string {
	d := strings.TrimSpace(string(body))
	if strings.Contains(d, "writ-enroll-") {
		return "(redacted)"
	}
	return d
}

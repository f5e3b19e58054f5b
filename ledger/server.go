package ledger

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/httpsig"
	"github.com/writ-fleet/writ/internal/httpapi"
	"github.com/writ-fleet/writ/keys"
)

// maxAdminBody bounds admin request bodies.
const maxAdminBody = 64 << 10

// Server is the ledger's HTTP API.
//
// Public reads:
//
//	GET  /v1/sites                 list sites
//	GET  /v1/sites/{site}          one site
//	GET  /v1/sites/{site}/trust    policy and signer keys of a site (verifiers cache this)
//	GET  /v1/keys?id=KEYID         one key
//	GET  /v1/users                 list users
//	GET  /v1/users/{name}          one user
//
// Admin writes (RFC 9421-signed by a user with role admin on "*"):
//
//	POST /v1/users                 create {name, roles, public_keys}
//	POST /v1/users/{name}/keys     add {public_key}
//	POST /v1/users/{name}/roles    bind {site, role} ("" role removes)
//	POST /v1/users/{name}/disable  and /enable
//	POST /v1/users/{name}/keys/rotate  {old_key_id, public_key}: add, then revoke
//	POST /v1/keys/revoke           revoke {key_id}
//	PUT  /v1/sites/{site}          create or replace {supervisor_url, policy, uptime_interval, script_memory}
//	POST /v1/sites/{site}/tokens   enrollment token {ttl} (the secret is shown once)
//	POST /v1/sites/{site}/tokens/{id}/revoke
//	POST /v1/nodes/{id}/revoke     the node never registers, reports or runs jobs again
//	GET  /v1/audit                 the newest admin writes
//
// Nodes (signed by the node's own key, keyid = node ID):
//
//	POST /v1/nodes/register        {site, token, public_key, facts, capacity}
//	POST /v1/nodes/{id}/uptime     {boot_id, uptime_seconds, at, used}
//
// Public node reads: GET /v1/nodes?site=S, GET /v1/nodes/{id},
// GET /v1/sites/{site}/tokens (no secrets). The whole API is described in
// openapi.yaml, served at /v1/openapi.yaml.
type Server struct {
	store        Store
	log          *slog.Logger
	reg          *prometheus.Registry
	verifier     *httpsig.Verifier
	regVerifier  *httpsig.Verifier
	nodeVerifier *httpsig.Verifier
	nkeys        nodeKeys
	now          func() time.Time
	writes       *prometheus.CounterVec
	trustSigner  *TrustSigner // nil: snapshots go out unsigned
	limits       *limiters
}

// ServerOptions are a Server's hardening settings.
type ServerOptions struct {
	// Authorities are the names (host, or host:port) signed requests must
	// be addressed to; none means any.
	Authorities []string
	// Nonces keeps the nonces of signed requests; nil keeps them in
	// memory. A store (Store's UseNonce) shares them between ledger
	// processes and keeps them across restarts.
	Nonces httpsig.NonceStore
	// RateLimits per source; nil means DefaultRateLimits, a Rate of 0
	// turns one off.
	RateLimits *[nLimits]RateLimit
	// RegisterRate, when not zero, replaces the registrations per second
	// a source may make (negative: no limit), e.g. for a fleet enrolling
	// from behind one NAT.
	RegisterRate float64
}

// Harden applies opts. Call before Handler.
func (s *Server) Harden(opts ServerOptions) {
	for _, v := range []*httpsig.Verifier{s.verifier, s.regVerifier, s.nodeVerifier} {
		v.Authorities = opts.Authorities
	}
	if opts.Nonces != nil {
		s.verifier.Nonces, s.regVerifier.Nonces = opts.Nonces, opts.Nonces
	}
	limits := DefaultRateLimits
	if opts.RateLimits != nil {
		limits = *opts.RateLimits
	}
	switch {
	case opts.RegisterRate < 0:
		limits[limitRegister].Rate = 0
	case opts.RegisterRate > 0:
		limits[limitRegister] = RateLimit{Rate: opts.RegisterRate, Burst: max(limits[limitRegister].Burst, int(10*opts.RegisterRate))}
	}
	s.limits = newLimiters(limits)
}

// SignTrust makes the server sign trust snapshots with signer (the
// ledger's certificate key). Call before Handler.
func (s *Server) SignTrust(signer *TrustSigner) { s.trustSigner = signer }

// NewServer returns the API over store. now may be nil (time.Now).
func NewServer(store Store, log *slog.Logger, reg *prometheus.Registry, now func() time.Time) *Server {
	if now == nil {
		now = time.Now
	}
	s := &Server{store: store, log: log, reg: reg, now: now, limits: newLimiters(DefaultRateLimits)}
	// A store that keeps nonces shares the replay guard between ledger
	// processes and across restarts; nil keeps them in memory.
	nonces, _ := store.(httpsig.NonceStore)
	s.verifier = &httpsig.Verifier{Keys: s.adminKey, Now: now, MaxBody: maxAdminBody, Nonces: nonces}
	// Node signatures must be as fresh as uptime reports. Registration
	// keeps nonces like admin writes; uptime reports need none (each
	// node's reports only move forward: ErrStaleReport), which at 100,000
	// nodes would double the ledger's writes.
	s.regVerifier = &httpsig.Verifier{Keys: s.nodeKey, Now: now, MaxBody: maxNodeBody, MaxAge: ReportWindow, Nonces: nonces}
	s.nodeVerifier = &httpsig.Verifier{Keys: s.nodeKey, Now: now, MaxBody: maxNodeBody, MaxAge: ReportWindow, Nonces: httpsig.NoReplayGuard{}}
	s.writes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "writ_ledger_admin_writes_total", Help: "Admin write requests by operation and outcome.",
	}, []string{"op", "outcome"})
	reg.MustRegister(s.writes)
	return s
}

// adminKey resolves a request signer: an active key of an enabled user who
// is admin on every site.
func (s *Server) adminKey(ctx context.Context, keyID string) (ed25519.PublicKey, string, error) {
	k, err := s.store.GetKey(ctx, keyID)
	if err != nil {
		return nil, "", errors.New("unknown key")
	}
	if k.RevokedAt != nil {
		return nil, "", errors.New("key is revoked")
	}
	u, err := s.store.GetUser(ctx, k.User)
	if err != nil {
		return nil, "", err
	}
	if u.Disabled {
		return nil, "", fmt.Errorf("user %s is disabled", u.Name)
	}
	if u.Roles[AllSites] != RoleAdmin {
		return nil, "", fmt.Errorf("user %s is not an admin", u.Name)
	}
	pub, _, err := keys.ParsePublic(k.PublicKey)
	if err != nil {
		return nil, "", err
	}
	return pub, u.Name, nil
}

// Handler returns the HTTP handler.
func (s *Server) Handler() http.Handler {
	r := httpapi.NewRouter(s.log)
	httpapi.Ops(r, s.reg, s.store.Ping)
	r.Route("/v1", func(r chi.Router) {
		r.Get("/sites", s.listSites)
		r.Get("/sites/{site}", s.getSite)
		r.Get("/sites/{site}/trust", s.getTrust)
		r.Get("/keys", s.getKey)
		r.Get("/users", s.listUsers)
		r.Get("/users/{name}", s.getUser)
		r.Get("/nodes", s.listNodes)
		r.Get("/nodes/{id}", s.getNode)
		r.Get("/sites/{site}/tokens", s.listTokens)
		r.Get("/openapi.yaml", serveOpenAPI)
		r.Post("/nodes/register", s.register)
		r.Post("/nodes/{id}/uptime", s.uptime)
		r.Group(func(r chi.Router) {
			r.Use(s.adminGate)
			r.Post("/users", s.admin("create_user", s.createUser))
			r.Post("/users/{name}/keys", s.admin("add_key", s.addKey))
			r.Post("/users/{name}/roles", s.admin("set_role", s.setRole))
			r.Post("/users/{name}/disable", s.admin("disable_user", s.setDisabled(true)))
			r.Post("/users/{name}/enable", s.admin("enable_user", s.setDisabled(false)))
			r.Post("/keys/revoke", s.admin("revoke_key", s.revokeKey))
			r.Put("/sites/{site}", s.admin("put_site", s.putSite))
			r.Post("/users/{name}/keys/rotate", s.admin("rotate_key", s.rotateKey))
			r.Post("/sites/{site}/tokens", s.admin("create_token", s.createToken))
			r.Post("/sites/{site}/tokens/{id}/revoke", s.admin("revoke_token", s.revokeToken))
			r.Post("/nodes/{id}/revoke", s.admin("revoke_node", s.revokeNode))
			r.Get("/audit", s.listAudit)
		})
	})
	return r
}

func storeErr(err error) error {
	switch {
	case errors.Is(err, ErrNotFound):
		return &httpapi.Error{Status: http.StatusNotFound, Reason: "not_found", Msg: err.Error()}
	case errors.Is(err, ErrExists):
		return &httpapi.Error{Status: http.StatusConflict, Reason: "exists", Msg: err.Error()}
	case errors.Is(err, ErrConflict):
		return &httpapi.Error{Status: http.StatusConflict, Reason: "conflict", Msg: err.Error()}
	case errors.Is(err, ErrStaleReport):
		return &httpapi.Error{Status: http.StatusConflict, Reason: "stale_report", Msg: err.Error() + " (a replay, or the node's clock went back)"}
	}
	return err
}

func (s *Server) admin(op string, fn func(r *http.Request, body []byte) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := httpapi.ReadBody(r, maxAdminBody)
		if err == nil {
			var v any
			if v, err = fn(r, body); err == nil {
				s.writes.WithLabelValues(op, "ok").Inc()
				s.log.Info("ledger admin write", "op", op, "by", httpsig.Principal(r.Context()), "path", r.URL.Path)
				s.audit(r.Context(), httpsig.Principal(r.Context()), op, r.URL.Path, auditDetail(body))
				httpapi.JSON(w, http.StatusOK, v)
				return
			}
		}
		s.writes.WithLabelValues(op, "error").Inc()
		httpapi.Fail(w, storeErr(err))
	}
}

func (s *Server) listSites(w http.ResponseWriter, r *http.Request) {
	sites, err := s.store.ListSites(r.Context())
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	if sites == nil {
		sites = []Site{}
	}
	httpapi.JSON(w, http.StatusOK, sites)
}

func (s *Server) getSite(w http.ResponseWriter, r *http.Request) {
	site, err := s.store.GetSite(r.Context(), chi.URLParam(r, "site"))
	if err != nil {
		httpapi.Fail(w, storeErr(err))
		return
	}
	httpapi.JSON(w, http.StatusOK, site)
}

func (s *Server) getTrust(w http.ResponseWriter, r *http.Request) {
	t, err := s.store.Trust(r.Context(), chi.URLParam(r, "site"))
	if err != nil {
		httpapi.Fail(w, storeErr(err))
		return
	}
	if t.Signers == nil {
		t.Signers = []Signer{}
	}
	st, err := s.trustSigner.Sign(t)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	httpapi.JSON(w, http.StatusOK, st)
}

func (s *Server) getKey(w http.ResponseWriter, r *http.Request) {
	k, err := s.store.GetKey(r.Context(), r.URL.Query().Get("id"))
	if err != nil {
		httpapi.Fail(w, storeErr(err))
		return
	}
	httpapi.JSON(w, http.StatusOK, k)
}

func (s *Server) listUsers(w http.ResponseWriter, r *http.Request) {
	users, err := s.store.ListUsers(r.Context())
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	if users == nil {
		users = []User{}
	}
	httpapi.JSON(w, http.StatusOK, users)
}

func (s *Server) getUser(w http.ResponseWriter, r *http.Request) {
	u, err := s.store.GetUser(r.Context(), chi.URLParam(r, "name"))
	if err != nil {
		httpapi.Fail(w, storeErr(err))
		return
	}
	httpapi.JSON(w, http.StatusOK, u)
}

// CreateUserRequest is the body of POST /v1/users.
type CreateUserRequest struct {
	Name       string            `json:"name"`
	Roles      map[string]string `json:"roles"`
	PublicKeys []string          `json:"public_keys"`
}

func badRequest(format string, a ...any) error {
	return &httpapi.Error{Status: http.StatusBadRequest, Reason: "invalid", Msg: fmt.Sprintf(format, a...)}
}

func checkRoles(roles map[string]string) error {
	for site, role := range roles {
		if site != AllSites && !envelope.ValidSite(site) {
			return badRequest("role binding names invalid site %q", site)
		}
		if !ValidRole(role) {
			return badRequest("unknown role %q (known: admin, deployer, viewer)", role)
		}
	}
	return nil
}

// NewKey parses an authorized_keys line into a Key for user.
func NewKey(user, line string) (Key, error) {
	pub, comment, err := keys.ParsePublic(line)
	if err != nil {
		return Key{}, badRequest("%v", err)
	}
	return Key{ID: keys.ID(pub), User: user, PublicKey: keys.FormatPublic(pub, comment)}, nil
}

func (s *Server) createUser(r *http.Request, body []byte) (any, error) {
	var req CreateUserRequest
	if err := httpapi.DecodeJSON(body, &req); err != nil {
		return nil, err
	}
	if !ValidUserName(req.Name) {
		return nil, badRequest("user name %q is invalid (lower-case letters, digits, . _ -; starts with a letter)", req.Name)
	}
	if err := checkRoles(req.Roles); err != nil {
		return nil, err
	}
	u := User{Name: req.Name, Roles: req.Roles, CreatedAt: s.now()}
	for _, line := range req.PublicKeys {
		k, err := NewKey(req.Name, line)
		if err != nil {
			return nil, err
		}
		u.Keys = append(u.Keys, k)
	}
	if err := s.store.CreateUser(r.Context(), u); err != nil {
		return nil, err
	}
	return s.store.GetUser(r.Context(), req.Name)
}

func (s *Server) addKey(r *http.Request, body []byte) (any, error) {
	var req struct {
		PublicKey string `json:"public_key"`
	}
	if err := httpapi.DecodeJSON(body, &req); err != nil {
		return nil, err
	}
	k, err := NewKey(chi.URLParam(r, "name"), req.PublicKey)
	if err != nil {
		return nil, err
	}
	k.CreatedAt = s.now()
	if err := s.store.AddKey(r.Context(), k); err != nil {
		return nil, err
	}
	return k, nil
}

func (s *Server) setRole(r *http.Request, body []byte) (any, error) {
	var req struct {
		Site string `json:"site"`
		Role string `json:"role"`
	}
	if err := httpapi.DecodeJSON(body, &req); err != nil {
		return nil, err
	}
	if req.Role != "" {
		if err := checkRoles(map[string]string{req.Site: req.Role}); err != nil {
			return nil, err
		}
	}
	name := chi.URLParam(r, "name")
	if err := s.store.SetRole(r.Context(), name, req.Site, req.Role); err != nil {
		return nil, err
	}
	return s.store.GetUser(r.Context(), name)
}

func (s *Server) setDisabled(disabled bool) func(*http.Request, []byte) (any, error) {
	return func(r *http.Request, _ []byte) (any, error) {
		name := chi.URLParam(r, "name")
		if err := s.store.SetUserDisabled(r.Context(), name, disabled); err != nil {
			return nil, err
		}
		return s.store.GetUser(r.Context(), name)
	}
}

func (s *Server) revokeKey(r *http.Request, body []byte) (any, error) {
	var req struct {
		KeyID string `json:"key_id"`
	}
	if err := httpapi.DecodeJSON(body, &req); err != nil {
		return nil, err
	}
	if err := s.store.RevokeKey(r.Context(), req.KeyID, s.now()); err != nil {
		return nil, err
	}
	return s.store.GetKey(r.Context(), req.KeyID)
}

func (s *Server) putSite(r *http.Request, body []byte) (any, error) {
	var site Site
	if err := httpapi.DecodeJSON(body, &site); err != nil {
		return nil, err
	}
	site.Name = chi.URLParam(r, "site")
	if err := ValidateSite(site); err != nil {
		return nil, badRequest("%v", err)
	}
	if err := s.store.PutSite(r.Context(), site); err != nil {
		return nil, err
	}
	return site, nil
}

// MinScriptMemory is the least a site may set as its script memory cap.
const MinScriptMemory = 16 << 20

// ValidateSite checks a site's name, supervisor URL and policy.
func ValidateSite(site Site) error {
	if !envelope.ValidSite(site.Name) {
		return fmt.Errorf("site name %q is invalid (lower-case letters, digits, dashes)", site.Name)
	}
	u, err := url.Parse(site.SupervisorURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("supervisor_url %q must be an http(s) URL", site.SupervisorURL)
	}
	if site.UptimeInterval < 0 || site.UptimeInterval > 3600 {
		return fmt.Errorf("uptime_interval %d s must be 0 (default %s) to 3600", site.UptimeInterval, DefaultUptimeInterval)
	}
	if site.ScriptMemory != 0 && site.ScriptMemory < MinScriptMemory {
		return fmt.Errorf("script_memory %d bytes must be 0 (the runners' own cap) or at least %d MiB", site.ScriptMemory, MinScriptMemory>>20)
	}
	return site.Policy.Validate()
}

// Init prepares an empty store: the first admin (role admin on "*") with
// one key, and optionally a first site. It refuses a store that has users.
func Init(ctx context.Context, store Store, adminName, adminKey string, site *Site) error {
	users, err := store.ListUsers(ctx)
	if err != nil {
		return err
	}
	if len(users) > 0 {
		return fmt.Errorf("ledger already initialised (%d users); refusing to add another first admin", len(users))
	}
	if !ValidUserName(adminName) {
		return fmt.Errorf("admin name %q is invalid", adminName)
	}
	k, err := NewKey(adminName, adminKey)
	if err != nil {
		return err
	}
	if err := store.CreateUser(ctx, User{Name: adminName, Roles: map[string]string{AllSites: RoleAdmin}, Keys: []Key{k}}); err != nil {
		return err
	}
	if site != nil {
		if err := ValidateSite(*site); err != nil {
			return err
		}
		return store.PutSite(ctx, *site)
	}
	return nil
}

// adminGate verifies admin signatures; a source whose requests fail is
// throttled (limitAdmin).
func (s *Server) adminGate(next http.Handler) http.Handler {
	verified := s.verifier.Middleware(next)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.limits.ok(limitAdmin, r) {
			httpapi.Fail(w, tooMany("failed admin request"))
			return
		}
		if _, err := httpsig.Parse(r, ""); err != nil {
			s.limits.allow(limitAdmin, r)
		}
		rec := &statusRecorder{ResponseWriter: w}
		verified.ServeHTTP(rec, r)
		if rec.status == http.StatusUnauthorized {
			s.limits.allow(limitAdmin, r)
		}
	})
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

// Package ledger is writ's registry and source of truth for identity: users
// and their public keys and roles per site, sites with their supervisor
// address, signing policy and uptime interval, enrollment tokens, nodes
// with their facts, capacity, uptime and liveness, and the audit log of
// admin writes.
//
// The package holds the types, the trust evaluation every verifier shares
// (Trust.Authorize), the HTTP API (Server), its client (Client) and the
// verifier-side cache (TrustCache). Stores live in ledger/store/*.
//
// Nodes register and report uptime with requests signed by their own keys
// (nodeapi.go). Reads are public (public keys are public); writes are admin calls signed
// with RFC 9421 HTTP Message Signatures by a user holding the admin role on
// every site ("*").
package ledger

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"github.com/writ-fleet/writ/job"
	"slices"
	"strings"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/keys"
)

// AllSites is the site name in a role binding that covers every site.
const AllSites = "*"

// Roles writ knows. Policies name which of them may sign jobs for a site.
const (
	RoleAdmin    = "admin"    // manages the ledger and may sign jobs
	RoleDeployer = "deployer" // may sign jobs
	RoleViewer   = "viewer"   // may read; may not sign
)

// DefaultPolicyRoles are the roles a new site accepts job signatures from.
var DefaultPolicyRoles = []string{RoleAdmin, RoleDeployer}

// Errors stores return.
var (
	ErrNotFound = errors.New("not found")
	ErrExists   = errors.New("already exists")
)

// ValidUserName reports whether s is a valid user name.
func ValidUserName(s string) bool { return envelope.ValidUser(s) }

// ValidRole reports whether r is a role writ knows.
func ValidRole(r string) bool { return r == RoleAdmin || r == RoleDeployer || r == RoleViewer }

// Key is a user's public key.
type Key struct {
	ID        string     `json:"id"`
	User      string     `json:"user"`
	PublicKey string     `json:"public_key"` // OpenSSH authorized_keys line
	CreatedAt time.Time  `json:"created_at"`
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
}

// User is a principal with keys and roles.
type User struct {
	Name      string            `json:"name"`
	Disabled  bool              `json:"disabled"`
	Roles     map[string]string `json:"roles"` // site (or "*") → role
	Keys      []Key             `json:"keys"`
	CreatedAt time.Time         `json:"created_at"`
}

// RoleOn returns the user's role on site: the site's own binding, else the
// "*" binding, else "".
func (u *User) RoleOn(site string) string {
	if r, ok := u.Roles[site]; ok {
		return r
	}
	return u.Roles[AllSites]
}

// Policy says who may sign jobs for a site.
type Policy struct {
	// Roles may sign jobs for the site.
	Roles []string `json:"roles"`
	// Threshold is how many distinct users must sign (k of n).
	Threshold int `json:"threshold"`
}

// Validate checks the policy.
func (p Policy) Validate() error {
	if p.Threshold < 1 || p.Threshold > envelope.MaxSignatures {
		return fmt.Errorf("policy threshold %d is out of range (1 to %d)", p.Threshold, envelope.MaxSignatures)
	}
	if len(p.Roles) == 0 {
		return errors.New("policy names no roles that may sign")
	}
	for _, r := range p.Roles {
		if !ValidRole(r) {
			return fmt.Errorf("policy names unknown role %q", r)
		}
	}
	return nil
}

// Site is a group of nodes served by one supervisor.
type Site struct {
	Name          string `json:"name"`
	SupervisorURL string `json:"supervisor_url"`
	Policy        Policy `json:"policy"`
	// UptimeInterval is how often the site's nodes report; zero means
	// DefaultUptimeInterval. Liveness is judged against it.
	UptimeInterval Seconds `json:"uptime_interval,omitzero"`
	// ScriptMemory caps what one job's script may hold on the site's
	// nodes, in bytes; zero leaves each runner's own cap (--script-memory),
	// which also bounds this.
	ScriptMemory int64 `json:"script_memory,omitzero"`
}

// Seconds is a duration kept and sent as whole seconds.
type Seconds int64

// Duration returns s as a time.Duration.
func (s Seconds) Duration() time.Duration { return time.Duration(s) * time.Second }

// Interval returns the site's uptime interval, defaulted.
func (s *Site) Interval() time.Duration {
	if s.UptimeInterval <= 0 {
		return DefaultUptimeInterval
	}
	return s.UptimeInterval.Duration()
}

// Signer is one key that may appear on a site's jobs, as a Trust lists it.
type Signer struct {
	KeyID     string `json:"key_id"`
	PublicKey string `json:"public_key"`
	User      string `json:"user"`
	Role      string `json:"role"`
	Revoked   bool   `json:"revoked,omitempty"`
	Disabled  bool   `json:"disabled,omitempty"`

	pub ed25519.PublicKey
}

// Trust is the snapshot a verifier needs for one site: its policy and every
// key of every user with a role on it (revoked and disabled ones flagged, so
// refusals can say why).
type Trust struct {
	Site    Site      `json:"site"`
	Signers []Signer  `json:"signers"`
	AsOf    time.Time `json:"as_of"`
	// RevokedNodes are the site's revoked nodes: their runners stop
	// taking work.
	RevokedNodes []string `json:"revoked_nodes,omitempty"`

	byID map[string]*Signer
	keys []envelope.TrustedKey // Signers' keys, in order, for Authorize
}

// NodeRevoked reports whether node is one of the site's revoked nodes.
func (t *Trust) NodeRevoked(node string) bool { return slices.Contains(t.RevokedNodes, node) }

// index parses public keys and builds the key index; call once after
// decoding.
func (t *Trust) index() error {
	t.byID = make(map[string]*Signer, len(t.Signers))
	t.keys = make([]envelope.TrustedKey, 0, len(t.Signers))
	for i := range t.Signers {
		s := &t.Signers[i]
		pub, _, err := keys.ParsePublic(s.PublicKey)
		if err != nil {
			return fmt.Errorf("trust for site %s: key %s: %w", t.Site.Name, s.KeyID, err)
		}
		s.pub = pub
		t.byID[s.KeyID] = s
		t.keys = append(t.keys, envelope.TrustedKey{ID: s.KeyID, Key: pub})
	}
	return nil
}

// RoleOf is user's role on the snapshot's site ("" for none).
func (t *Trust) RoleOf(user string) string {
	for i := range t.Signers {
		if t.Signers[i].User == user && !t.Signers[i].Revoked && !t.Signers[i].Disabled {
			return t.Signers[i].Role
		}
	}
	return ""
}

// Has reports whether keyID appears in the snapshot.
func (t *Trust) Has(keyID string) bool {
	_, ok := t.byID[keyID]
	return ok
}

// Authorize checks env's signatures against the site's keys and policy: the
// valid signatures of active keys whose users hold an allowed role must come
// from at least Threshold distinct users. It returns those users, in the
// order of their first counting signature (the first is the job's owner), or an
// *envelope.Error naming the most specific problem: unknown_key,
// revoked_key, bad_signature, role_not_allowed or below_threshold. It does
// not check the job's time window or site (see envelope.Job).
//
// A signature's key ID only says which key to try first (DSSE: it must not
// decide anything): a signature with an empty or foreign key ID is tried
// against every key of the site, so it counts when a registered key made
// it. That bounds the work to len(signatures) × len(keys) verifications.
// Revoked, disabled and role-less keys are tried too, so a signature they
// made is refused for that reason and not as unknown.
func (t *Trust) Authorize(env *envelope.Envelope) ([]string, error) {
	if len(env.Signatures) == 0 {
		return nil, envelope.Refuse(job.ReasonNoSignature, "envelope carries no signatures")
	}
	allowed := map[string]bool{}
	for _, r := range t.Site.Policy.Roles {
		allowed[r] = true
	}
	var problem error
	note := func(err error) {
		if problem == nil {
			problem = err
		}
	}
	// Users in the order of their first counting signature: the first is
	// the job's owner (verify.Checked).
	var names []string
	counted := map[string]bool{}
	for i, j := range env.Signers(t.keys) {
		hint := env.Signatures[i].KeyID
		if j < 0 {
			if _, known := t.byID[hint]; known {
				note(envelope.Refuse(job.ReasonBadSignature, fmt.Sprintf("signature by key %s (user %s) does not verify: the job was altered or signed with another key", hint, t.byID[hint].User)))
			} else {
				note(envelope.Refuse(job.ReasonUnknownKey, fmt.Sprintf("signature %d (key id %q) is by a key not registered for site %s", i, hint, t.Site.Name)))
			}
			continue
		}
		s := &t.Signers[j]
		switch {
		case s.Revoked:
			note(envelope.Refuse(job.ReasonRevokedKey, fmt.Sprintf("key %s of user %s was revoked", s.KeyID, s.User)))
		case s.Disabled:
			note(envelope.Refuse(job.ReasonRevokedKey, fmt.Sprintf("user %s (key %s) is disabled", s.User, s.KeyID)))
		case !allowed[s.Role]:
			note(envelope.Refuse(job.ReasonRoleNotAllowed, fmt.Sprintf("user %s has role %q on site %s, which may not sign jobs (allowed: %s)", s.User, s.Role, t.Site.Name, strings.Join(t.Site.Policy.Roles, ", "))))
		case !counted[s.User]:
			counted[s.User] = true
			names = append(names, s.User)
		}
	}
	if len(names) >= t.Site.Policy.Threshold {
		return names, nil
	}
	if problem != nil {
		return nil, problem
	}
	return nil, envelope.Refuse(job.ReasonBelowThreshold, fmt.Sprintf("site %s requires signatures from %d distinct users; got %d (%s)", t.Site.Name, t.Site.Policy.Threshold, len(names), strings.Join(names, ", ")))
}

// Store is what the ledger server needs from a store.
type Store interface {
	CreateUser(ctx context.Context, u User) error
	GetUser(ctx context.Context, name string) (*User, error)
	ListUsers(ctx context.Context) ([]User, error)
	SetUserDisabled(ctx context.Context, name string, disabled bool) error
	SetRole(ctx context.Context, user, site, role string) error
	AddKey(ctx context.Context, k Key) error
	GetKey(ctx context.Context, id string) (*Key, error)
	RevokeKey(ctx context.Context, id string, at time.Time) error
	PutSite(ctx context.Context, s Site) error
	GetSite(ctx context.Context, name string) (*Site, error)
	ListSites(ctx context.Context) ([]Site, error)
	// Trust returns the site and the keys of every user with a role on it.
	Trust(ctx context.Context, site string) (*Trust, error)
	Ping(ctx context.Context) error

	// Enrollment tokens; secretHash is the hex SHA-256 of the secret.
	CreateToken(ctx context.Context, t Token, secretHash string) error
	ListTokens(ctx context.Context, site string) ([]Token, error)
	RevokeToken(ctx context.Context, id string, at time.Time) error
	TokenBySecret(ctx context.Context, secretHash string) (*Token, error)
	// RegisterNode inserts a node, or updates the facts and capacity of
	// the same key on the same site (created is false then); the same key
	// on another site is ErrConflict.
	// A new node consumes one use of token (the ID of the token it
	// enrolled with; "" for a caller that needs none, such as writ dev):
	// ErrTokenUsedUp when none is left. A revoked node is ErrNodeRevoked.
	RegisterNode(ctx context.Context, n Node, token string) (created bool, err error)
	// RevokeNode revokes a node; revoking twice keeps the first time.
	RevokeNode(ctx context.Context, id string, at time.Time) error
	GetNode(ctx context.Context, id string) (*Node, error)
	// ListNodes lists a site's nodes ("" for all).
	ListNodes(ctx context.Context, site string) ([]Node, error)
	// ReportUptime records a report; it returns whether the report starts
	// a new boot after an earlier one, and the boots counted so far.
	ReportUptime(ctx context.Context, id string, u Uptime) (restarted bool, boots int64, err error)
	AddAudit(ctx context.Context, e AuditEntry) error
	ListAudit(ctx context.Context, limit int) ([]AuditEntry, error)
}

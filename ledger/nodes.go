package ledger

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"time"
)

// ErrConflict: the request contradicts the ledger (a node key registered
// to another site).
var ErrConflict = errors.New("conflict")

// ErrStaleReport is an uptime report no later than the node's last one: a
// replayed request (or a node clock that went back). Each node's reports
// only move forward, which is the replay guard of the uptime path: it
// costs no write beyond the report's own.
var ErrStaleReport = errors.New("report is not after the node's last one")

// NodeID is a node's ID: "n" and 20 hex digits of the SHA-256 of its public
// key. It is derived, so a node cannot claim another's ID, and it is safe as
// a queue name.
func NodeID(pub ed25519.PublicKey) string {
	sum := sha256.Sum256(pub)
	return "n" + hex.EncodeToString(sum[:10])
}

// Token is a site's enrollment token. The secret is shown once, when it is
// created; the ledger keeps only its SHA-256.
type Token struct {
	ID        string     `json:"id"`
	Site      string     `json:"site"`
	Secret    string     `json:"secret,omitempty"`
	CreatedBy string     `json:"created_by"`
	CreatedAt time.Time  `json:"created_at"`
	ExpiresAt time.Time  `json:"expires_at"`
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
	// MaxUses is how many nodes the token may enroll (0: no bound, for
	// tokens made before uses were counted); Uses how many it did.
	MaxUses int64 `json:"max_uses"`
	Uses    int64 `json:"uses"`
}

// Live reports whether the token may enroll a node at now.
func (t *Token) Live(now time.Time) bool {
	return t.RevokedAt == nil && now.Before(t.ExpiresAt) && (t.MaxUses == 0 || t.Uses < t.MaxUses)
}

// ErrTokenUsedUp is a token that enrolled as many nodes as it may.
var ErrTokenUsedUp = errors.New("enrollment token is used up")

// ErrNodeRevoked is a node an admin revoked.
var ErrNodeRevoked = errors.New("node is revoked")

// Capacity is what a node offers, or what its workloads use.
type Capacity struct {
	CPUs      int   `json:"cpus"`
	MemoryMiB int64 `json:"memory_mib"`
	DiskGiB   int64 `json:"disk_gib"`
}

// Facts are a node's hardware and software, as it reports them.
type Facts struct {
	Hostname    string `json:"hostname"`
	Kernel      string `json:"kernel"`
	WritVersion string `json:"writ_version"`
	CPUs        int    `json:"cpus"`
	MemoryMiB   int64  `json:"memory_mib"`
	Disks       []struct {
		Name      string `json:"name"`
		SizeBytes int64  `json:"size_bytes"`
	} `json:"disks,omitempty"`
	NICs []struct {
		Name string `json:"name"`
		MAC  string `json:"mac"`
	} `json:"nics,omitempty"`
}

// Liveness of a node, from its last uptime report against its site's
// interval.
const (
	LivenessOnline  = "online"  // reported within 2 intervals
	LivenessStale   = "stale"   // within 5
	LivenessOffline = "offline" // longer ago, or never
	LivenessRevoked = "revoked" // revoked by an admin: never again
)

// Node is a registered node.
type Node struct {
	ID           string    `json:"id"`
	Site         string    `json:"site"`
	PublicKey    string    `json:"public_key"` // authorized_keys line
	Facts        Facts     `json:"facts"`
	Capacity     Capacity  `json:"capacity"`
	Used         Capacity  `json:"used"`
	RegisteredAt time.Time `json:"registered_at"`
	// The last uptime report.
	BootID        string    `json:"boot_id,omitempty"`
	UptimeSeconds int64     `json:"uptime_seconds"`
	LastReport    time.Time `json:"last_report,omitzero"`
	// Boots counts the distinct boots seen (restarts + 1).
	Boots int64 `json:"boots"`
	// RevokedAt is when an admin revoked the node: it may not register,
	// report or run jobs again.
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
	// Liveness is derived when the node is read.
	Liveness string `json:"liveness"`
}

// SetLiveness derives n.Liveness at now for a site reporting every interval.
func (n *Node) SetLiveness(now time.Time, interval time.Duration) {
	age := now.Sub(n.LastReport)
	switch {
	case n.RevokedAt != nil:
		n.Liveness = LivenessRevoked
	case n.LastReport.IsZero():
		n.Liveness = LivenessOffline
	case age <= 2*interval:
		n.Liveness = LivenessOnline
	case age <= 5*interval:
		n.Liveness = LivenessStale
	default:
		n.Liveness = LivenessOffline
	}
}

// Uptime is one signed uptime report of a node.
type Uptime struct {
	BootID        string    `json:"boot_id"`
	UptimeSeconds int64     `json:"uptime_seconds"`
	At            time.Time `json:"at"`
	Used          Capacity  `json:"used"`
	// Queued says the report waited in the node's queue while the ledger
	// was out of reach (or the node was down): its time may be up to
	// MaxQueuedAge old. A report that did not wait is held to
	// ReportWindow, which catches a node whose clock is wrong.
	Queued bool `json:"queued,omitempty"`
}

// AuditEntry records one admin write: who did what, when.
type AuditEntry struct {
	ID     string    `json:"id"`
	At     time.Time `json:"at"`
	Actor  string    `json:"actor"`
	Op     string    `json:"op"`
	Target string    `json:"target"`
	Detail string    `json:"detail,omitempty"`
}

// DefaultUptimeInterval is how often nodes report unless the site says.
const DefaultUptimeInterval = time.Minute

package job

import (
	"encoding/json"
	"net/http"
)

// Bounds of one batch request.
const (
	// MaxBatch bounds the envelopes in one batch request.
	MaxBatch = 512
	// MaxBatchBytes bounds a batch request's body; coord splits batches to
	// stay under it.
	MaxBatchBytes = 16 << 20
)

// Verdict is the supervisor's answer for one envelope.
type Verdict struct {
	ID     string `json:"id,omitempty"`
	State  string `json:"state"` // queued, duplicate or rejected
	Reason Reason `json:"reason,omitempty"`
	Error  string `json:"error,omitempty"`
	// Retry is set when the job could not be judged for a passing reason
	// (Redis or the ledger unreachable): submit it again later.
	Retry bool `json:"retry,omitempty"`
}

// Verdict states.
const (
	VerdictQueued    = "queued"
	VerdictDuplicate = "duplicate"
	VerdictRejected  = "rejected"
)

// Status returns the HTTP status that answers a verdict (Reason.Status
// for a refusal).
func Status(v Verdict) int {
	if v.State != VerdictRejected {
		return http.StatusAccepted
	}
	if v.Retry {
		return http.StatusServiceUnavailable
	}
	return v.Reason.Status()
}

// Placed is a batch item that carries coord's placement of a job that
// pins no node: {"place": NODE, "envelope": {...}}. The placement only
// routes the job to the node's queue; it is not signed and grants nothing.
type Placed struct {
	Place    string          `json:"place"`
	Envelope json.RawMessage `json:"envelope"`
}

// PlacedItem is the batch item for an envelope placed on node.
func PlacedItem(node string, raw []byte) []byte {
	b, _ := json.Marshal(Placed{Place: node, Envelope: raw})
	return b
}

// Package job holds what every service says about a job: its states, the
// events that move it between them, coord's record of it, and the verdict a
// supervisor gives a submitted envelope (with the HTTP status that answers
// it). It is data only: queue persists these, coord, the supervisor and the
// runner produce and read them, and none of them imports another for it.
package job

import (
	"encoding/json"
	"time"
)

// State is a job's state as coord tracks it.
type State string

// Job states.
const (
	StatePending   State = "pending"   // accepted by coord, supervisor not reached yet
	StateQueued    State = "queued"    // enqueued by the site's supervisor
	StateRunning   State = "running"   // a runner is running it
	StateRetrying  State = "retrying"  // a run failed; another will follow
	StateSucceeded State = "succeeded" // done; result is set
	StateFailed    State = "failed"    // failed for good; error and reason say why
	StateRejected  State = "rejected"  // refused before running; reason says why
)

// String implements fmt.Stringer.
func (s State) String() string { return string(s) }

// Terminal reports whether the job is over.
func (s State) Terminal() bool {
	return s == StateSucceeded || s == StateFailed || s == StateRejected
}

// StateOf maps an event to the state it moves the job to ("" for none).
func StateOf(t EventType) State {
	switch t {
	case EventQueued:
		return StateQueued
	case EventRejected:
		return StateRejected
	case EventStarted:
		return StateRunning
	case EventRetrying:
		return StateRetrying
	case EventSucceeded:
		return StateSucceeded
	case EventFailed:
		return StateFailed
	}
	return ""
}

// Record is coord's record of a job: its state and what its events told.
type Record struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	Site string `json:"site"`
	Node string `json:"node,omitempty"`
	// Users are the users whose signatures counted when coord verified
	// the job: they may read it (and so may the site's viewers,
	// deployers and admins).
	Users       []string        `json:"users,omitempty"`
	State       State           `json:"state"`
	Reason      Reason          `json:"reason,omitempty"`
	Error       string          `json:"error,omitempty"`
	Attempts    int             `json:"attempts"`
	SubmittedAt time.Time       `json:"submitted_at"`
	QueuedAt    *time.Time      `json:"queued_at,omitempty"`
	StartedAt   *time.Time      `json:"started_at,omitempty"`
	FinishedAt  *time.Time      `json:"finished_at,omitempty"`
	Result      json.RawMessage `json:"result,omitempty"`
	// ResultSig is the signature of the node that ran it (Node) over a
	// flow step's result.
	ResultSig []byte `json:"result_sig,omitempty"`
}

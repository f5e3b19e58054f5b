package job

import (
	"encoding/json"
	"time"
)

// EventType is what happened to a job.
type EventType string

// Event types, in the order a job usually sees them.
const (
	EventQueued    EventType = "queued"    // supervisor accepted and enqueued it
	EventRejected  EventType = "rejected"  // refused before running (reason says why)
	EventStarted   EventType = "started"   // a runner began a run
	EventLog       EventType = "log"       // the script wrote a log line
	EventRetrying  EventType = "retrying"  // a run failed and will be retried
	EventSucceeded EventType = "succeeded" // a run finished; result is set
	EventFailed    EventType = "failed"    // the job failed for good
)

// String implements fmt.Stringer.
func (t EventType) String() string { return string(t) }

// Terminal reports whether the event ends the job.
func (t EventType) Terminal() bool {
	return t == EventRejected || t == EventSucceeded || t == EventFailed
}

// Event is one entry of a site's event stream.
type Event struct {
	// Seq is the stream entry ID ("ms-seq"), set when read back.
	Seq     string          `json:"seq,omitempty"`
	Job     string          `json:"job"`
	Type    EventType       `json:"type"`
	At      time.Time       `json:"at"`
	Name    string          `json:"name,omitempty"`
	Site    string          `json:"site,omitempty"`
	Node    string          `json:"node,omitempty"`
	Attempt int             `json:"attempt,omitempty"`
	Level   string          `json:"level,omitempty"`
	Message string          `json:"message,omitempty"`
	Reason  Reason          `json:"reason,omitempty"`
	Error   string          `json:"error,omitempty"`
	Result  json.RawMessage `json:"result,omitempty"`
	// ResultSig is the node's signature over a flow step's result
	// (envelope.SignOutput), on its succeeded event.
	ResultSig []byte `json:"result_sig,omitempty"`
}

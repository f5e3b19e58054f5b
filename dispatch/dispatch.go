// Package dispatch is the node protocol of a dispatched site. The site's
// supervisor holds the asynq workers (Server: a few polling loops for the
// whole site, not four per node) and pushes each job to a node over that
// node's own long-lived stream; the node runs it and reports its events
// and its end back (Client). Nodes never talk to the site's Redis: an idle
// node costs one idle HTTPS connection, and no Redis credential is ever
// on a node.
//
// A node is its registered key: every request is RFC 9421-signed with the
// node key, keyid = node ID, checked against the ledger (the node must be
// registered to the site and not revoked). The server sends a node only
// site jobs and the jobs pinned to it, and takes events only for the jobs
// it sent that node; a revoked node's stream is cut within the node-key
// cache's life.
//
// Wire (JSON):
//
//	GET  /v1/node/work?slots=N   a stream of Delivery lines (newline-delimited JSON; {} lines keep it alive)
//	POST /v1/node/report         Report: a job's events, and its end (Done)
//	GET  /v1/node/ping           200 when the node may take work
//
// Delivery is at least once, as with asynq: the server's handler holds
// the asynq task while the node runs it, so a killed supervisor's tasks
// are recovered by asynq's lease, and a node that disconnects is given
// DisconnectGrace to come back and report before its jobs are retried.
package dispatch

import (
	"encoding/json"
	"time"

	"github.com/writ-fleet/writ/job"
)

// Delivery is one job sent to a node, or, with Cancel, word that a job
// sent it was cancelled: the node stops its run.
type Delivery struct {
	ID       string          `json:"id"`
	Envelope json.RawMessage `json:"envelope,omitempty"`
	Attempt  int             `json:"attempt,omitempty"`
	MaxRetry int             `json:"max_retry,omitempty"`
	Cancel   bool            `json:"cancel,omitempty"`
}

// CancelGrace is how long the dispatcher waits, once it told a node to
// stop a cancelled job, for the node to report the run's end.
const CancelGrace = 10 * time.Second

// Report is a node's word on a job it was sent: events to publish, and
// when it ended, Done.
type Report struct {
	ID     string      `json:"id"`
	Events []job.Event `json:"events,omitempty"`
	Done   *Done       `json:"done,omitempty"`
}

// Outcomes of a run.
const (
	OutcomeOK    = "ok"
	OutcomeRetry = "retry"
	OutcomeFail  = "fail"
)

// Done is how a run ended.
type Done struct {
	Outcome string `json:"outcome"`
	Error   string `json:"error,omitempty"`
}

// Bounds and timings of the protocol.
const (
	// MaxSlots bounds what a node may ask for at once.
	MaxSlots = 1024
	// MaxReportBytes bounds one report (a run's result is at most 1 MiB).
	MaxReportBytes = 4 << 20
	// MaxJobEvents and MaxJobReportBytes bound what one run may publish.
	MaxJobEvents      = 20000
	MaxJobReportBytes = 64 << 20
	// Heartbeat is how often an idle stream carries a {} line.
	Heartbeat = 15 * time.Second
	// DisconnectGrace is how long a node that lost its stream has to come
	// back and report a job before it is retried elsewhere.
	DisconnectGrace = 30 * time.Second
	// nodeKeyTTL is how long a refusal of a node's key is kept, and how
	// often a stream checks its node is not revoked.
	nodeKeyTTL = 10 * time.Second
	// dispatcherTTL is how long a dispatcher's count of its nodes stands
	// for the site queue's pause without being renewed (it is, every
	// third of it): a dead dispatcher's nodes stop counting after it.
	dispatcherTTL = 15 * time.Second
	// goodKeyTTL is how long a node's key is kept (keys never change;
	// revocation is checked apart, on the site's trust snapshot).
	goodKeyTTL = 10 * time.Minute
)

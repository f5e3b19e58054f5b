package identity

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"

	"github.com/writ-fleet/writ/internal/atomicfile"
	"github.com/writ-fleet/writ/ledger"
)

// QueueFile is the undelivered uptime reports' file in the state directory.
const QueueFile = "uptime-queue.json"

// maxQueued bounds the queue: one report per boot, the newest boots kept.
// A node that boots this many times while the ledger is away loses the
// count of its oldest boots, not its newest.
const maxQueued = 64

// reportQueue holds the uptime reports the ledger has not acknowledged, in
// time order, on the state directory, so that neither a ledger outage nor
// the node's own reboot loses them.
//
// The ledger keeps, of a node's reports, only the newest and the boots it
// saw (each boot's ID and first time). A later report of the same boot says
// everything an earlier one did, so the queue keeps one report per boot,
// the newest: a ledger back after five minutes learns that the node stayed
// up, and a node that rebooted while the ledger was away has each boot
// counted.
type reportQueue struct {
	path string
	mu   sync.Mutex
	list []ledger.Uptime // guarded by mu; oldest first
}

// loadQueue reads the queue a previous run left. Every report in it waited,
// so each is sent as queued. A file that cannot be read is set aside (its
// name gains ".bad"): the reports in it are lost, the node is not.
func loadQueue(dir string) (*reportQueue, error) {
	q := &reportQueue{path: filepath.Join(dir, QueueFile)}
	b, err := os.ReadFile(q.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return q, nil
	case err != nil:
		return nil, fmt.Errorf("identity: uptime queue: %w", err)
	}
	if err := json.Unmarshal(b, &q.list); err != nil || len(q.list) > maxQueued {
		if err := os.Rename(q.path, q.path+".bad"); err != nil {
			return nil, fmt.Errorf("identity: uptime queue %s is unreadable and cannot be set aside: %w", q.path, err)
		}
		q.list = nil
		return q, fmt.Errorf("identity: uptime queue %s was unreadable, set aside as %s.bad", q.path, q.path)
	}
	for i := range q.list {
		q.list[i].Queued = true
	}
	return q, nil
}

// add queues u: it replaces the newest report if that is of the same boot,
// and the oldest boot goes when the queue is full. The queue is on disk
// before add returns.
func (q *reportQueue) add(u ledger.Uptime) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if n := len(q.list); n > 0 && q.list[n-1].BootID == u.BootID {
		q.list[n-1] = u
	} else {
		q.list = append(q.list, u)
		if len(q.list) > maxQueued {
			q.list = q.list[len(q.list)-maxQueued:]
		}
	}
	return q.saveLocked()
}

// head returns the oldest report, if any.
func (q *reportQueue) head() (ledger.Uptime, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.list) == 0 {
		return ledger.Uptime{}, false
	}
	return q.list[0], true
}

// done removes the oldest report if it is still u (an add may have
// replaced it with a newer one meanwhile, which is then still to send).
func (q *reportQueue) done(u ledger.Uptime) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.list) == 0 || !q.list[0].At.Equal(u.At) || q.list[0].BootID != u.BootID {
		return nil
	}
	q.list = q.list[1:]
	return q.saveLocked()
}

// waited marks every report queued: the ledger did not take the first.
func (q *reportQueue) waited() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	changed := false
	for i := range q.list {
		changed = changed || !q.list[i].Queued
		q.list[i].Queued = true
	}
	if !changed {
		return nil
	}
	return q.saveLocked()
}

// len is how many reports wait.
func (q *reportQueue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.list)
}

func (q *reportQueue) saveLocked() error {
	b, err := json.Marshal(q.list)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(q.path, b, 0o600); err != nil {
		return fmt.Errorf("identity: uptime queue: %w", err)
	}
	return nil
}

// settled reports whether the ledger answered a report in a way that
// sending it again cannot change: it has it already (a lost answer, then
// stale_report), or it refuses it for good (too old, malformed). Such a
// report leaves the queue; an outage, a refused signature or a revoked
// node does not settle it.
func settled(err error) bool {
	var ae *ledger.APIError
	if !errors.As(err, &ae) {
		return false
	}
	switch {
	case ae.Status == http.StatusConflict && ae.Body.Reason == "stale_report":
		return true
	case ae.Status == http.StatusBadRequest:
		return true
	}
	return false
}

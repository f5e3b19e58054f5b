package coord

import (
	"sync"

	"github.com/writ-fleet/writ/job"
)

// hub wakes the requests waiting on a job (GET ?wait, event streams) when
// the follower has applied one of its events. It only wakes: the waiter
// reads state from Redis, which the follower updated before publishing, so
// a waiter that subscribes and then reads can never miss the end of a job.
type hub struct {
	mu   sync.Mutex
	subs map[string]map[chan job.Event]struct{} // guarded by mu; job ID → subscribers
}

func newHub() *hub { return &hub{subs: map[string]map[chan job.Event]struct{}{}} }

// subscribe returns a channel of the job's events and a func to unsubscribe.
// The channel is buffered; when a slow subscriber's buffer is full, further
// events are dropped for it, and it re-reads Redis instead.
func (h *hub) subscribe(id string) (<-chan job.Event, func()) {
	ch := make(chan job.Event, 64)
	h.mu.Lock()
	if h.subs[id] == nil {
		h.subs[id] = map[chan job.Event]struct{}{}
	}
	h.subs[id][ch] = struct{}{}
	h.mu.Unlock()
	return ch, func() {
		h.mu.Lock()
		delete(h.subs[id], ch)
		if len(h.subs[id]) == 0 {
			delete(h.subs, id)
		}
		h.mu.Unlock()
	}
}

func (h *hub) publish(ev job.Event) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for ch := range h.subs[ev.Job] {
		select {
		case ch <- ev:
		default:
		}
	}
}

package supervisor

import (
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/writ-fleet/writ/queue"
)

// eventServer streams the site's job events to followers (coord) as
// server-sent events: "id:" is the event's stream sequence and "data:" its
// JSON as stored (without seq). A follower resumes with ?after=<last id>
// and misses nothing.
type eventServer struct {
	redis *queue.Redis
	site  string
	log   *slog.Logger
	// open bounds the streams served at once: each holds a blocking
	// Redis read, and the pool is shared with submissions.
	open chan struct{}
}

// maxStreams bounds the event streams a supervisor serves at once (coords
// follow a site with one stream each).
const maxStreams = 16

// heartbeat is how often an idle stream sends a comment, so proxies and the
// follower can tell a quiet stream from a dead one.
const heartbeat = 5 * time.Second

func (e *eventServer) serve(w http.ResponseWriter, r *http.Request) {
	select {
	case e.open <- struct{}{}:
		defer func() { <-e.open }()
	default:
		http.Error(w, fmt.Sprintf("the supervisor serves %d event streams at once; close one", maxStreams), http.StatusTooManyRequests)
		return
	}
	after := r.URL.Query().Get("after")
	if after == "" {
		after = "$"
	}
	if after == "$" {
		// Resolve "$" once; re-sending "$" on every read would skip events
		// published between reads.
		seq, err := e.redis.LastEventSeq(r.Context(), e.site)
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		after = seq
	}
	flusher, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	flusher.Flush()
	ctx := r.Context()
	for ctx.Err() == nil {
		evs, err := e.redis.ReadRawEvents(ctx, e.site, after, 1000, heartbeat)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			e.log.Warn("read site events", "err", err)
			fmt.Fprintf(w, ": error %v\n\n", err)
			flusher.Flush()
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
			continue
		}
		if len(evs) == 0 {
			if _, err := fmt.Fprint(w, ": ping\n\n"); err != nil {
				return
			}
			flusher.Flush()
			continue
		}
		// Events go out as stored; the SSE id carries the sequence.
		for _, ev := range evs {
			if _, err := fmt.Fprintf(w, "id: %s\ndata: %s\n\n", ev.Seq, ev.JSON); err != nil {
				return
			}
			after = ev.Seq
		}
		flusher.Flush()
	}
}

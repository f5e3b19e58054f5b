package dispatch

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/httpsig"
	"github.com/writ-fleet/writ/internal/httpapi"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/verify"
)

// NodeKeyFunc returns the public key of a node registered to the site and
// not revoked, or an error saying why the node may not take work.
type NodeKeyFunc func(ctx context.Context, id string) (ed25519.PublicKey, error)

// Server dispatches a site's jobs to its connected nodes.
type Server struct {
	Site    string
	Redis   *queue.Redis // the site's: asynq, and the event stream
	NodeKey NodeKeyFunc  // required
	// Revoked reports whether the site revoked node (from its trust
	// snapshot, one cached fetch for all nodes); a revoked node's stream
	// is cut. Nil: only NodeKey's refusals at connect count.
	Revoked func(ctx context.Context, node string) bool
	Log     *slog.Logger
	// Concurrency is how many jobs the server holds at once (asynq worker
	// slots, over all nodes); zero means 1024.
	Concurrency int
	// Authorities are the names (host, or host:port) a node's signed
	// requests must be addressed to: one signed for another server is
	// refused. Empty accepts any.
	Authorities []string
	// Poll: see queue.WorkerConfig.
	Poll time.Duration
	Now  func() time.Time

	once     sync.Once
	verifier *httpsig.Verifier

	id      string     // this dispatcher, among the site's (random, per process)
	pauseMu sync.Mutex // orders this dispatcher's node counts
	paused  bool       // guarded by pauseMu: the queue's state after the last count

	mu      sync.Mutex
	conns   map[string]*conn       // guarded by mu; node → its current stream
	busy    map[string]int         // guarded by mu; node → jobs sent, not ended
	pending map[string]*pendingJob // guarded by mu; job ID → where it went
	wake    chan struct{}          // guarded by mu; closed when a slot frees or a node connects
	keys    map[string]keyEntry    // guarded by mu
}

type conn struct {
	node  string
	slots int
	out   chan Delivery
	gone  chan struct{} // closed when the stream ends
	kick  chan struct{} // closed to end the stream (a newer one, a revocation)
}

type pendingJob struct {
	id     string
	node   string
	done   chan Done // buffered 1
	gone   chan struct{}
	events int   // guarded by Server.mu: events published for the job
	bytes  int64 // guarded by Server.mu
}

type keyEntry struct {
	pub ed25519.PublicKey
	err error
	at  time.Time
}

func (s *Server) init() {
	s.once.Do(func() {
		if s.Now == nil {
			s.Now = time.Now
		}
		s.conns, s.busy, s.pending, s.keys = map[string]*conn{}, map[string]int{}, map[string]*pendingJob{}, map[string]keyEntry{}
		s.wake = make(chan struct{})
		var b [8]byte
		rand.Read(b[:])
		s.id = hex.EncodeToString(b[:])
		// No replay guard: a replayed stream request or report does
		// nothing (reports are accepted once per job), and they travel in
		// TLS; the created time bounds a signature's life.
		s.verifier = &httpsig.Verifier{Keys: s.key, Now: s.Now, MaxBody: MaxReportBytes, MaxAge: 2 * time.Minute, Nonces: httpsig.NoReplayGuard{}, Authorities: s.Authorities}
	})
}

// key resolves a node's key, cached for nodeKeyTTL.
func (s *Server) key(ctx context.Context, id string) (ed25519.PublicKey, string, error) {
	if !envelope.ValidNode(id) {
		return nil, "", errors.New("not a node ID")
	}
	now := s.Now()
	s.mu.Lock()
	e, ok := s.keys[id]
	s.mu.Unlock()
	// A node's key never changes: a good one is kept long, a refusal
	// briefly (the node may be registering right now).
	ttl := nodeKeyTTL
	if ok && e.err == nil {
		ttl = goodKeyTTL
	}
	if !ok || now.Sub(e.at) >= ttl {
		pub, err := s.NodeKey(ctx, id)
		e = keyEntry{pub: pub, err: err, at: now}
		s.mu.Lock()
		if len(s.keys) > 100000 {
			clear(s.keys)
		}
		s.keys[id] = e
		s.mu.Unlock()
	}
	if e.err != nil {
		return nil, "", e.err
	}
	if s.Revoked != nil && s.Revoked(ctx, id) {
		return nil, "", errors.New("node is revoked")
	}
	return e.pub, id, nil
}

// Mount adds the node endpoints to r.
func (s *Server) Mount(r chi.Router) {
	s.init()
	r.Get("/v1/node/work", s.work)
	r.Post("/v1/node/report", s.report)
	r.Get("/v1/node/ping", s.ping)
}

func (s *Server) authenticate(w http.ResponseWriter, r *http.Request) (string, bool) {
	_, node, err := s.verifier.Verify(r)
	if err != nil {
		status := http.StatusUnauthorized
		var he *httpsig.Error
		if errors.As(err, &he) {
			status = he.Status
		}
		httpapi.JSON(w, status, httpapi.ErrorBody{Error: "node signature: " + err.Error(), Reason: "unauthenticated"})
		return "", false
	}
	return node, true
}

func (s *Server) ping(w http.ResponseWriter, r *http.Request) {
	if _, ok := s.authenticate(w, r); ok {
		httpapi.JSON(w, http.StatusOK, map[string]string{"status": "ok"})
	}
}

// work is a node's stream: deliveries as they come, {} while idle.
func (s *Server) work(w http.ResponseWriter, r *http.Request) {
	node, ok := s.authenticate(w, r)
	if !ok {
		return
	}
	slots, err := strconv.Atoi(r.URL.Query().Get("slots"))
	if err != nil || slots < 1 || slots > MaxSlots {
		httpapi.Fail(w, httpapi.Errorf(http.StatusBadRequest, "slots must be 1-%d", MaxSlots))
		return
	}
	flusher, ok := w.(http.Flusher)
	if !ok {
		httpapi.Fail(w, errors.New("streaming unsupported"))
		return
	}
	c := &conn{node: node, slots: slots, out: make(chan Delivery, slots), gone: make(chan struct{}), kick: make(chan struct{})}
	s.mu.Lock()
	if old := s.conns[node]; old != nil {
		close(old.kick) // the node reconnected: its newest stream wins
	}
	first := len(s.conns) == 0
	s.conns[node] = c
	s.wakeLocked()
	s.mu.Unlock()
	if first {
		s.syncPause()
	}
	s.Log.Info("node connected", "node", node, "slots", slots)
	defer s.disconnect(c)

	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	io := json.NewEncoder(w)
	if _, err := w.Write([]byte("{}\n")); err != nil {
		return
	}
	flusher.Flush()
	beat := time.NewTicker(Heartbeat)
	defer beat.Stop()
	check := time.NewTicker(nodeKeyTTL / 2)
	defer check.Stop()
	for {
		select {
		case d := <-c.out:
			if err := io.Encode(d); err != nil {
				if !d.Cancel {
					s.requeue(d.ID, "the node's stream broke before the job reached it")
				}
				return
			}
			flusher.Flush()
		case <-beat.C:
			if _, err := w.Write([]byte("{}\n")); err != nil {
				return
			}
			flusher.Flush()
		case <-check.C:
			// A revoked node is cut off.
			if s.Revoked != nil && s.Revoked(r.Context(), node) {
				s.Log.Warn("node is revoked: stream closed", "node", node)
				return
			}
		case <-c.kick:
			return
		case <-r.Context().Done():
			return
		}
	}
}

// disconnect ends c: jobs still queued on it go back at once; jobs the
// node has get DisconnectGrace to be reported.
func (s *Server) disconnect(c *conn) {
	s.mu.Lock()
	if s.conns[c.node] == c {
		delete(s.conns, c.node)
	}
	none := len(s.conns) == 0
	close(c.gone)
	s.mu.Unlock()
	if none {
		s.syncPause()
	}
	for {
		select {
		case d := <-c.out:
			if !d.Cancel {
				s.requeue(d.ID, "the node disconnected before the job reached it")
			}
		default:
			s.Log.Info("node disconnected", "node", c.node)
			return
		}
	}
}

func (s *Server) requeue(id, why string) {
	s.finish(id, "", Done{Outcome: OutcomeRetry, Error: why})
}

// finish ends a pending job with d; node, when set, must be the node it
// was sent to. It reports whether the job was pending.
func (s *Server) finish(id, node string, d Done) bool {
	s.mu.Lock()
	p := s.pending[id]
	if p == nil || (node != "" && p.node != node) {
		s.mu.Unlock()
		return false
	}
	s.mu.Unlock()
	select {
	case p.done <- d:
	default: // already ended
	}
	return true
}

func (s *Server) report(w http.ResponseWriter, r *http.Request) {
	node, ok := s.authenticate(w, r)
	if !ok {
		return
	}
	body, err := httpapi.ReadBody(r, MaxReportBytes)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	var rep Report
	if err := httpapi.DecodeJSON(body, &rep); err != nil {
		httpapi.Fail(w, err)
		return
	}
	s.mu.Lock()
	p := s.pending[rep.ID]
	over := false
	if p != nil && p.node == node {
		// A node that floods the site's stream for its job is cut short:
		// an honest runner's log budget stays far below these.
		p.events += len(rep.Events)
		p.bytes += int64(len(body))
		over = p.events > MaxJobEvents || p.bytes > MaxJobReportBytes
	}
	s.mu.Unlock()
	if p == nil || p.node != node {
		// Only the node a job was sent to speaks for it.
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusNotFound, Reason: "not_found", Msg: "no job " + rep.ID + " is running on node " + node})
		return
	}
	if over && len(rep.Events) > 0 {
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusTooManyRequests, Reason: "too_many_events", Msg: fmt.Sprintf("job %s has sent more than %d events or %d bytes", rep.ID, MaxJobEvents, MaxJobReportBytes)})
		return
	}
	if len(rep.Events) > 0 {
		for i := range rep.Events {
			ev := &rep.Events[i]
			if ev.Job != rep.ID {
				httpapi.Fail(w, httpapi.Errorf(http.StatusBadRequest, "event of job %s in a report of job %s", ev.Job, rep.ID))
				return
			}
			ev.Site = s.Site
			if ev.Node != "" {
				ev.Node = node
			}
		}
		if err := s.Redis.Publish(r.Context(), s.Site, rep.Events...); err != nil {
			httpapi.Fail(w, httpapi.Errorf(http.StatusServiceUnavailable, "publish: %v", err))
			return
		}
	}
	if rep.Done != nil {
		switch rep.Done.Outcome {
		case OutcomeOK, OutcomeRetry, OutcomeFail:
		default:
			httpapi.Fail(w, httpapi.Errorf(http.StatusBadRequest, "outcome %q", rep.Done.Outcome))
			return
		}
		s.finish(rep.ID, node, *rep.Done)
	}
	httpapi.JSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

func (s *Server) wakeLocked() {
	close(s.wake)
	s.wake = make(chan struct{})
}

// pick returns a connected node with a free slot: pin, or the least busy.
func (s *Server) pickLocked(pin string) *conn {
	if pin != "" {
		if c := s.conns[pin]; c != nil && s.busy[pin] < c.slots {
			return c
		}
		return nil
	}
	var best *conn
	bestFree := 0
	for id, c := range s.conns {
		if free := c.slots - s.busy[id]; free > bestFree {
			best, bestFree = c, free
		}
	}
	return best
}

// syncPause tells the site's Redis how many nodes this dispatcher has,
// which pauses the site queue while no dispatcher of the site has one, so
// its jobs wait there, as they would for runners (or for another
// dispatcher's nodes), instead of being held here until their deadlines
// (and retried, or failed, for nothing); and resumes it when one connects.
// Serialized, so a pause never lands after a later resume. It runs at
// every first connect and last disconnect, and every dispatcherTTL/3: a
// dispatcher that dies stops counting after dispatcherTTL.
func (s *Server) syncPause() {
	s.pauseMu.Lock()
	defer s.pauseMu.Unlock()
	s.mu.Lock()
	n := len(s.conns)
	s.mu.Unlock()
	paused, err := s.Redis.SetDispatching(s.Site, s.id, n, dispatcherTTL)
	if err != nil {
		s.Log.Warn("count this dispatcher's nodes for the site queue's pause", "nodes", n, "err", err)
		return
	}
	if paused != s.paused {
		s.Log.Info("site queue", "paused", paused, "nodes here", n)
	}
	s.paused = paused
}

// Run takes the site's jobs from Redis and dispatches them until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	s.init()
	s.syncPause()
	go func() {
		t := time.NewTicker(dispatcherTTL / 3)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				s.syncPause()
			}
		}
	}()
	n := s.Concurrency
	if n == 0 {
		n = 1024
	}
	return s.Redis.Work(ctx, queue.WorkerConfig{
		Site:        s.Site,
		Queues:      map[string]int{queue.SiteQueue(s.Site): 1},
		Concurrency: n,
		// A few loops for the whole site: the point of dispatching.
		Dequeuers:    2,
		PollInterval: s.Poll,
		Log:          s.Log,
	}, s.handle)
}

// handle holds one asynq task while a node runs it.
func (s *Server) handle(ctx context.Context, d queue.Delivery) error {
	pin, prefer := "", ""
	var resources bool
	if task, isStep, _ := verify.ParseStepTask(d.Envelope); isStep {
		// A step of a flow: its node and resources are the signed flow's.
		if _, fl, err := verify.DecodeFlow(task.Flow); err == nil {
			if s := fl.Step(task.Step); s != nil {
				pin, resources = s.Node, s.Resources != envelope.Resources{}
			}
		}
	} else if env, err := envelope.Decode(d.Envelope); err == nil {
		if spec, err := env.Job(); err == nil {
			pin = spec.Node
			resources = spec.Resources != envelope.Resources{}
		}
	}
	if pin == "" && resources {
		// coord placed it (a job that states resources) on a node.
		prefer, _ = s.Redis.Placement(ctx, s.Site, d.ID)
	}
	for {
		s.mu.Lock()
		if p := s.pending[d.ID]; p != nil {
			// asynq runs a task once at a time; a second delivery of one
			// still pending is a recovered lease: wait for the first.
			s.mu.Unlock()
			return fmt.Errorf("job %s is still running on node %s", d.ID, p.node)
		}
		// A placed job waits for its node like a pinned one while that
		// node is connected (coord reserved room there); a placement on a
		// node that is gone falls back to any node.
		target := pin
		if target == "" && prefer != "" && s.conns[prefer] != nil {
			target = prefer
		}
		c := s.pickLocked(target)
		if c == nil {
			wake := s.wake
			s.mu.Unlock()
			select {
			case <-wake:
				continue
			case <-ctx.Done():
				return fmt.Errorf("no node took the job (pinned to %q): %w", pin, ctx.Err())
			}
		}
		p := &pendingJob{id: d.ID, node: c.node, done: make(chan Done, 1), gone: c.gone}
		s.pending[d.ID] = p
		s.busy[c.node]++
		s.mu.Unlock()
		defer func() {
			s.mu.Lock()
			delete(s.pending, d.ID)
			if s.busy[p.node]--; s.busy[p.node] <= 0 {
				delete(s.busy, p.node)
			}
			s.wakeLocked()
			s.mu.Unlock()
		}()
		select {
		case c.out <- Delivery{ID: d.ID, Envelope: d.Envelope, Attempt: d.Attempt, MaxRetry: d.MaxRetry}:
		default:
			return fmt.Errorf("node %s's stream is full", c.node)
		}
		return s.await(ctx, p)
	}
}

// await waits for the job's end; a node that disconnects has
// DisconnectGrace to reconnect and report it.
func (s *Server) await(ctx context.Context, p *pendingJob) error {
	var grace <-chan time.Time
	gone := p.gone
	for {
		select {
		case d := <-p.done:
			switch d.Outcome {
			case OutcomeOK:
				return nil
			case OutcomeFail:
				return queue.NoRetry(errors.New(d.Error))
			default:
				return errors.New(d.Error)
			}
		case <-gone:
			gone = nil
			grace = time.After(DisconnectGrace)
		case <-grace:
			return fmt.Errorf("runner_lost: node %s disconnected and did not report the job within %s", p.node, DisconnectGrace)
		case <-ctx.Done():
			s.stopCancelled(p)
			return ctx.Err()
		}
	}
}

// stopCancelled, when the job whose hold ended was cancelled (not the
// dispatcher stopping: asynq's cancel ends a running task's context),
// tells its node to stop the run, and waits up to CancelGrace for the
// node to report its end (its events are taken while it is pending).
func (s *Server) stopCancelled(p *pendingJob) {
	ctx, cancel := context.WithTimeout(context.Background(), CancelGrace)
	defer cancel()
	if yes, err := s.Redis.CancelRequested(ctx, s.Site, p.id); err != nil || !yes {
		return
	}
	s.mu.Lock()
	c := s.conns[p.node]
	s.mu.Unlock()
	if c == nil {
		return // its stream is gone: the node's run ends with its DisconnectGrace
	}
	select {
	case c.out <- Delivery{ID: p.id, Cancel: true}:
	default:
		s.Log.Warn("could not tell a node to stop a cancelled job: its stream is full", "job", p.id, "node", p.node)
		return
	}
	s.Log.Info("told the node to stop a cancelled job", "job", p.id, "node", p.node)
	select {
	case <-p.done:
	case <-ctx.Done():
	}
}

// Connected returns how many nodes have a stream open.
func (s *Server) Connected() int {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Package supervisor is the gate of one site: it verifies every submitted job
// (signatures and the site's policy from the ledger, validity window, replay,
// script compiles with allowed imports only), enqueues the accepted ones on
// the site's or the pinned node's queue, and serves the site's job events.
//
// HTTP API:
//
//	POST /v1/jobs          one DSSE envelope → 202 {id, state} or 4xx {error, reason, id}
//	POST /v1/jobs/batch    JSON array of envelopes → 200 [verdict...], one per envelope
//	GET  /v1/events?after= the site's event stream as server-sent events
//
// A job is enqueued with its ID as the task ID and its nonce claimed until
// it expires, so submitting the same envelope twice runs it once and a
// different job reusing a nonce is refused as a replay.
package supervisor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"runtime"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/writ-fleet/writ/dispatch"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/httpapi"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/scripts"
	"github.com/writ-fleet/writ/verify"
)

// DefaultCoordName is the certificate name of coord.
const DefaultCoordName = "coord"

// Params are a Supervisor's dependencies.
type Params struct {
	Site    string             // required: the site this supervisor serves
	Trust   verify.TrustSource // required: *ledger.TrustCache
	Redis   *queue.Redis       // required: the site's Redis
	Scripts *scripts.Engine    // required: validates scripts
	Log     *slog.Logger       // required
	Metrics *prometheus.Registry
	// Coord names the services whose certificates may submit and read
	// events (over TLS); nil means "coord". Over plain HTTP (loopback)
	// nothing is checked.
	Coord []string
	// Dispatch, when set, dispatches the site's jobs to nodes over their
	// own streams (package dispatch): its endpoints are served here, and
	// every job goes on the site queue, which it alone reads.
	Dispatch *dispatch.Server
	Now      func() time.Time // optional, time.Now
}

// Supervisor serves one site.
type Supervisor struct {
	p        Params
	kept     keptFlows // the flow envelopes this supervisor stored in the site's Redis
	events   *eventServer
	jobs     *prometheus.CounterVec
	verifies *prometheus.CounterVec
	admitDur prometheus.Histogram
}

// New returns a Supervisor.
func New(p Params) (*Supervisor, error) {
	if !envelope.ValidSite(p.Site) {
		return nil, fmt.Errorf("supervisor: invalid site name %q", p.Site)
	}
	if p.Trust == nil || p.Redis == nil || p.Scripts == nil || p.Log == nil {
		return nil, errors.New("supervisor: Trust, Redis, Scripts and Log are required")
	}
	if p.Now == nil {
		p.Now = time.Now
	}
	if p.Metrics == nil {
		p.Metrics = prometheus.NewRegistry()
	}
	s := &Supervisor{p: p}
	s.events = &eventServer{redis: p.Redis, site: p.Site, log: p.Log, open: make(chan struct{}, maxStreams)}
	s.jobs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "writ_supervisor_jobs_total", Help: "Jobs judged by the supervisor, by verdict and reason.",
	}, []string{"site", "verdict", "reason"})
	s.verifies = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "writ_supervisor_verification_failures_total", Help: "Envelopes refused, by reason.",
	}, []string{"site", "reason"})
	s.admitDur = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "writ_supervisor_batch_seconds", Help: "Time to judge and enqueue one batch.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
	})
	depth := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "writ_queue_depth", Help: "Jobs waiting in the site queue (pending, retry, scheduled).",
		ConstLabels: prometheus.Labels{"queue": queue.SiteQueue(p.Site)},
	}, func() float64 {
		d, err := p.Redis.QueueDepth(queue.SiteQueue(p.Site))
		if err != nil {
			return -1
		}
		return float64(d[queue.SiteQueue(p.Site)])
	})
	p.Metrics.MustRegister(s.jobs, s.verifies, s.admitDur, depth)
	return s, nil
}

// Handler returns the HTTP API.
func (s *Supervisor) Handler() http.Handler {
	r := httpapi.NewRouter(s.p.Log)
	httpapi.Ops(r, s.p.Metrics, s.p.Redis.Ping)
	coord := s.p.Coord
	if len(coord) == 0 {
		coord = []string{DefaultCoordName}
	}
	if s.p.Dispatch != nil {
		// Nodes prove themselves with their node keys, not certificates.
		s.p.Dispatch.Mount(r)
	}
	r.Group(func(r chi.Router) {
		// Only coord submits and reads the site's events: a stranger
		// could place a job on a queue nobody reads, or read every job's
		// results.
		r.Use(httpapi.RequirePeer(coord...))
		r.Post("/v1/jobs", s.postJob)
		r.Post("/v1/jobs/batch", s.postBatch)
		r.Post("/v1/jobs/{id}/cancel", s.cancelJob)
		r.Get("/v1/events", s.events.serve)
	})
	return r
}

func (s *Supervisor) postJob(w http.ResponseWriter, r *http.Request) {
	body, err := httpapi.ReadBody(r, envelope.MaxEnvelopeBytes)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	v := s.Submit(r.Context(), [][]byte{body})[0]
	httpapi.JSON(w, job.Status(v), v)
}

// CancelReply is what POST /v1/jobs/{id}/cancel answers.
type CancelReply struct {
	ID     string             `json:"id"`
	Result queue.Cancellation `json:"result"`
}

// cancelJob cancels a job of the site (?node= names the node whose queue
// may hold it, pinned or placed): a queued one is removed and ends
// cancelled, a running one is stopped (see queue.CancelJob).
func (s *Supervisor) cancelJob(w http.ResponseWriter, r *http.Request) {
	id, node := chi.URLParam(r, "id"), r.URL.Query().Get("node")
	if len(id) != 64 || (node != "" && !envelope.ValidNode(node)) {
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusBadRequest, Reason: "malformed", Msg: "a job ID (64 hex characters) and, optionally, a node ID"})
		return
	}
	// A job is on the site queue, or, pinned or placed, on its node's.
	queues := []string{queue.SiteQueue(s.p.Site)}
	if node != "" && s.p.Dispatch == nil {
		queues = append(queues, queue.NodeQueue(node))
	}
	res, err := s.p.Redis.CancelJob(r.Context(), s.p.Site, id, queues...)
	if err != nil {
		httpapi.Fail(w, httpapi.Errorf(http.StatusServiceUnavailable, "cancel: %v", err))
		return
	}
	s.p.Log.Info("job cancel", "job", id, "result", res)
	httpapi.JSON(w, http.StatusOK, CancelReply{ID: id, Result: res})
}

func (s *Supervisor) postBatch(w http.ResponseWriter, r *http.Request) {
	body, err := httpapi.ReadBody(r, job.MaxBatchBytes)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	var raws []json.RawMessage
	if err := json.Unmarshal(body, &raws); err != nil {
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusBadRequest, Reason: "malformed", Msg: "batch must be a JSON array of envelopes: " + err.Error()})
		return
	}
	if len(raws) > job.MaxBatch {
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusRequestEntityTooLarge, Reason: "too_large", Msg: fmt.Sprintf("batch has %d envelopes, the limit is %d", len(raws), job.MaxBatch)})
		return
	}
	in := make([][]byte, len(raws))
	places := make([]string, len(raws))
	for i, raw := range raws {
		in[i] = raw
		var item job.Placed
		if bytes.Contains(raw[:min(len(raw), 16)], []byte(`"place"`)) && json.Unmarshal(raw, &item) == nil && len(item.Envelope) > 0 {
			in[i], places[i] = item.Envelope, item.Place
		}
	}
	httpapi.JSON(w, http.StatusOK, s.submit(r.Context(), in, places))
}

// candidate is an envelope that passed the checks that need no Redis.
type candidate struct {
	place string    // coord's placement, for a job that pins no node
	hold  time.Time // a flow step's not_before
	flow  *flowCopy // a flow step's flow, kept once in the site's Redis (raw names it)
	idx   int
	raw   []byte
	job   *envelope.Job
	id    string
	claim queue.Claim
}

// Submit judges a batch of envelopes and enqueues the accepted ones. It
// returns one verdict per envelope, in order. Checks run in parallel; Redis
// work is pipelined across the batch.
func (s *Supervisor) Submit(ctx context.Context, raws [][]byte) []job.Verdict {
	return s.submit(ctx, raws, make([]string, len(raws)))
}

// submit is Submit with coord's placements (places[i] is "" for none).
func (s *Supervisor) submit(ctx context.Context, raws [][]byte, places []string) []job.Verdict {
	start := time.Now()
	defer func() { s.admitDur.Observe(time.Since(start).Seconds()) }()
	out := make([]job.Verdict, len(raws))
	cands := make([]*candidate, len(raws))
	now := s.p.Now()

	// Stage 1: decode, verify and validate, in parallel (CPU-bound). A
	// batch carries each flow's envelope once: the other steps of the flow
	// in it name the flow instead.
	flows := batchFlows(raws)
	var g errgroup.Group
	g.SetLimit(runtime.GOMAXPROCS(0))
	for i, raw := range raws {
		g.Go(func() error {
			c, v := s.check(ctx, raw, flows, now)
			if c != nil && places[i] != "" && c.job.Node == "" {
				if !envelope.ValidNode(places[i]) {
					c, v = nil, rejected(c.id, envelope.Refuse(job.ReasonInvalidJob, "placement "+places[i]+" is not a node ID"))
				} else {
					c.place = places[i]
				}
			}
			if c != nil {
				c.idx = i
				cands[i] = c
			} else {
				out[i] = v
			}
			return nil
		})
	}
	g.Wait()

	var live []*candidate
	for _, c := range cands {
		if c != nil {
			live = append(live, c)
		}
	}
	if len(live) == 0 {
		s.count(out)
		return out
	}

	// Stage 2: claim nonces for the whole batch in one round trip.
	claims := make([]queue.Claim, len(live))
	for i, c := range live {
		claims[i] = c.claim
	}
	adm, err := s.p.Redis.Admit(ctx, claims)
	if err != nil {
		for _, c := range live {
			out[c.idx] = job.Verdict{ID: c.id, State: job.VerdictRejected, Reason: job.ReasonRedisUnavailable, Error: err.Error(), Retry: true}
		}
		s.count(out)
		return out
	}

	// Stage 3: keep the flows of the steps to enqueue (once each, before
	// any task names them), then enqueue what is new (or was claimed by an
	// earlier attempt that did not finish), concurrently.
	skip := make([]bool, len(live))
	if err := s.keepFlows(ctx, live, adm); err != nil {
		for i, c := range live {
			if c.flow != nil {
				out[c.idx] = job.Verdict{ID: c.id, State: job.VerdictRejected, Reason: job.ReasonRedisUnavailable, Error: err.Error(), Retry: true}
				skip[i] = true
			}
		}
	}
	var eg errgroup.Group
	eg.SetLimit(32)
	for i, c := range live {
		if skip[i] {
			continue
		}
		switch adm[i] {
		case queue.AdmitReplay:
			out[c.idx] = rejected(c.id, envelope.Refuse(job.ReasonReplayed, "nonce "+c.job.Nonce+" was already used by another job"))
			continue
		case queue.AdmitDuplicate, queue.AdmitEnded:
			out[c.idx] = job.Verdict{ID: c.id, State: job.VerdictDuplicate}
			continue
		}
		inFlight := adm[i] == queue.AdmitInFlight
		eg.Go(func() error {
			q := queue.SiteQueue(s.p.Site)
			switch {
			case s.p.Dispatch != nil:
				// The dispatcher holds the site queue and sends a pinned
				// job only to its node; coord's placement it reads apart.
				if c.place != "" && c.job.Node == "" {
					if err := s.p.Redis.SetPlacement(ctx, s.p.Site, c.id, c.place, time.Until(c.job.Expires)+time.Hour); err != nil {
						s.p.Log.Warn("placement not recorded; any node may take the job", "job", c.id, "err", err)
					}
				}
			case c.job.Node != "":
				q = queue.NodeQueue(c.job.Node)
			case c.place != "":
				q = queue.NodeQueue(c.place)
			}
			task := queue.Task{
				ID: c.id, Envelope: c.raw, Queue: q, MaxRetry: c.job.MaxRetries,
				Timeout: c.job.RunTimeout(), ProcessAt: c.hold,
			}
			var dup bool
			var err error
			if inFlight {
				// An earlier admission did not finish: its task may have
				// run and ended since, so none is added for a job that did.
				var ended bool
				dup, ended, err = s.p.Redis.EnqueueUnlessEnded(ctx, s.p.Site, task)
				dup = dup || ended
			} else {
				dup, err = s.p.Redis.Enqueue(ctx, task)
			}
			switch {
			case err != nil:
				out[c.idx] = job.Verdict{ID: c.id, State: job.VerdictRejected, Reason: job.ReasonRedisUnavailable, Error: err.Error(), Retry: true}
			case dup:
				out[c.idx] = job.Verdict{ID: c.id, State: job.VerdictDuplicate}
			default:
				out[c.idx] = job.Verdict{ID: c.id, State: job.VerdictQueued}
			}
			return nil
		})
	}
	eg.Wait()

	// Stage 4: mark enqueued claims and publish queued events together.
	var done []queue.Claim
	var events []job.Event
	for _, c := range live {
		v := out[c.idx]
		if v.State == job.VerdictQueued || v.State == job.VerdictDuplicate {
			done = append(done, c.claim)
		}
		if v.State == job.VerdictQueued {
			node := c.job.Node
			if node == "" {
				node = c.place
			}
			events = append(events, job.Event{Job: c.id, Type: job.EventQueued, At: now, Name: c.job.Name, Site: s.p.Site, Node: node})
		}
	}
	if len(done) > 0 {
		if err := s.p.Redis.Queued(ctx, s.p.Site, done, events); errors.Is(err, queue.ErrNotReplicated) {
			// The jobs are enqueued on the primary only, and a failover
			// could lose them: coord sends them again (admission is
			// idempotent) until they are on a replica too.
			for _, c := range live {
				if v := out[c.idx]; v.State == job.VerdictQueued || v.State == job.VerdictDuplicate {
					out[c.idx] = job.Verdict{ID: c.id, State: job.VerdictRejected, Reason: job.ReasonRedisUnavailable, Error: err.Error(), Retry: true}
				}
			}
		} else if err != nil {
			// The jobs are enqueued; a lost mark only means a duplicate
			// submission re-checks with asynq, and a lost event is
			// superseded by the runner's.
			s.p.Log.Warn("record queued jobs", "err", err)
		}
	}
	s.count(out)
	return out
}

func rejected(id string, err error) job.Verdict {
	return job.Verdict{ID: id, State: job.VerdictRejected, Reason: envelope.ReasonOf(err), Error: err.Error()}
}

func (s *Supervisor) count(out []job.Verdict) {
	for _, v := range out {
		s.jobs.WithLabelValues(s.p.Site, v.State, string(v.Reason)).Inc()
		if v.State == job.VerdictRejected && !v.Retry {
			s.verifies.WithLabelValues(s.p.Site, string(v.Reason)).Inc()
			s.p.Log.Info("job rejected", "job", v.ID, "reason", v.Reason, "error", v.Error)
		}
	}
}

// check runs every check that needs no Redis: the one verification every
// service runs (verify.Job: decoding, site, time window, signatures and
// policy; verify.StepJob for a step of a flow), then script compilation.
func (s *Supervisor) check(ctx context.Context, raw []byte, flows map[string][]byte, now time.Time) (*candidate, job.Verdict) {
	if task, isStep, err := verify.ParseStepTask(raw); isStep {
		if err != nil {
			return nil, rejected("", err)
		}
		if len(task.Flow) == 0 {
			if task.Flow = flows[task.FlowRef]; task.Flow == nil {
				// Not in this batch: one the site keeps (an earlier batch's).
				if b, err := s.p.Redis.SiteFlowEnvelope(ctx, s.p.Site, task.FlowRef); err == nil {
					task.Flow = b
				} else if !errors.Is(err, queue.ErrNoFlow) {
					return nil, job.Verdict{State: job.VerdictRejected, Reason: job.ReasonRedisUnavailable, Error: err.Error(), Retry: true}
				}
			}
		}
		return s.checkStep(ctx, task, now)
	}
	id, c, err := verify.Job(ctx, s.p.Trust, raw, verify.Target{Site: s.p.Site}, now)
	if verify.Retry(err) {
		return nil, job.Verdict{ID: id, State: job.VerdictRejected, Reason: job.ReasonLedgerUnavailable, Error: err.Error(), Retry: true}
	}
	if err != nil {
		return nil, rejected(id, err)
	}
	if err := s.p.Scripts.Check(c.Job.Script); err != nil {
		return nil, rejected(id, err)
	}
	return &candidate{raw: raw, job: c.Job, id: id, claim: queue.Claim{Site: s.p.Site, Nonce: c.Job.Nonce, JobID: id, Until: c.Job.Expires}}, job.Verdict{}
}

// StepNonce is the replay-guard nonce of a flow step's job id. Its colon
// is outside the grammar of a signed job's nonce, so no job can claim a
// step's nonce first and have the step refused as replayed.
func StepNonce(id string) string { return "step:" + id }

// checkStep is check for a step of a flow. Its job ID is derived from the
// flow, the step, the item and the run number, and is its own nonce: every
// step of a flow shares the flow's nonce, and each of its runs is admitted
// once. A step held by its not_before is scheduled for then.
func (s *Supervisor) checkStep(ctx context.Context, task *verify.StepTask, now time.Time) (*candidate, job.Verdict) {
	c, step, err := verify.StepJob(ctx, s.p.Trust, task, verify.Target{Site: s.p.Site}, now)
	if verify.Retry(err) {
		return nil, job.Verdict{State: job.VerdictRejected, Reason: job.ReasonLedgerUnavailable, Error: err.Error(), Retry: true}
	}
	if err != nil {
		return nil, rejected("", err)
	}
	if err := s.p.Scripts.Check(c.Job.Script); err != nil {
		return nil, rejected(c.ID, err)
	}
	// Queued naming its flow by the ID its envelope hashes to (not the one
	// it was sent with), which the site keeps once (stage 3).
	raw, err := verify.RefStepTask(*task, step.FlowID)
	if err != nil {
		return nil, rejected(c.ID, err)
	}
	return &candidate{raw: raw, job: c.Job, id: c.ID, hold: step.Flow.Step(step.Name).NotBefore,
		flow:  &flowCopy{id: step.FlowID, envelope: task.Flow, expires: step.Flow.Expires},
		claim: queue.Claim{Site: s.p.Site, Nonce: StepNonce(c.ID), JobID: c.ID, Until: c.Job.Expires}}, job.Verdict{}
}

// flowCopy is a flow envelope a step's task names.
type flowCopy struct {
	id       string
	envelope []byte
	expires  time.Time
}

// batchFlows indexes the flow envelopes a batch's step tasks carry, by ID.
func batchFlows(raws [][]byte) map[string][]byte {
	var out map[string][]byte
	for _, raw := range raws {
		task, isStep, err := verify.ParseStepTask(raw)
		if !isStep || err != nil || len(task.Flow) == 0 {
			continue
		}
		env, _, err := verify.DecodeFlow(task.Flow)
		if err != nil {
			continue
		}
		if out == nil {
			out = map[string][]byte{}
		}
		out[env.ID()] = task.Flow
	}
	return out
}

// keptFlows remembers, for a while, which flows this supervisor stored in
// the site's Redis, so a fan-out's steps store their flow once.
type keptFlows struct {
	mu   sync.Mutex
	byID map[string]time.Time // guarded by mu; when it was stored
}

// keptFor is how long a stored flow is taken as still there without
// storing it again (a Redis that lost it, a failover, is caught up then).
const keptFor = time.Minute

// keepFlows stores the flows of the candidates that will be enqueued, each
// once, before any of their tasks is.
func (s *Supervisor) keepFlows(ctx context.Context, live []*candidate, adm []queue.Admission) error {
	now := time.Now()
	todo := map[string]queue.SiteFlow{}
	s.kept.mu.Lock()
	for i, c := range live {
		if c.flow == nil || (adm[i] != queue.AdmitNew && adm[i] != queue.AdmitInFlight) {
			continue
		}
		if at, ok := s.kept.byID[c.flow.id]; ok && now.Sub(at) < keptFor {
			continue
		}
		todo[c.flow.id] = queue.SiteFlow{Envelope: c.flow.envelope, Expires: c.flow.expires}
	}
	s.kept.mu.Unlock()
	if len(todo) == 0 {
		return nil
	}
	if err := s.p.Redis.StoreSiteFlows(ctx, s.p.Site, todo); err != nil {
		return err
	}
	s.kept.mu.Lock()
	defer s.kept.mu.Unlock()
	if s.kept.byID == nil || len(s.kept.byID) > 4096 {
		s.kept.byID = map[string]time.Time{}
	}
	for id := range todo {
		s.kept.byID[id] = now
	}
	return nil
}

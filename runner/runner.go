// Package runner runs jobs on a node. It takes its deliveries from a Queue
// (the site's Redis through package queue, or the site's dispatcher over
// the node's signed stream through package dispatch), and for every one
// verifies the signed envelope again (neither Redis nor the dispatcher is a
// trust boundary), runs the script in a sandbox process with the job's
// deadline, and reports started, log, retrying, succeeded and failed
// events. A job cancelled while it runs stops, and ends cancelled rather
// than being retried.
//
// Failures are sorted into two outcomes: retry (infrastructure: the ledger or
// a host layer was unavailable; retried with backoff up to the job's
// max_retries) and fail (the job itself is wrong: bad signature, expired,
// script error, timeout, allocation cap; never retried). A panic becomes a
// failure carrying the file and line where it happened.
package runner

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/stack"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/scripts"
	"github.com/writ-fleet/writ/seal"
	"github.com/writ-fleet/writ/verify"
)

// Defaults for Params.
const (
	DefaultConcurrency = 10
	// logFlushInterval is how often a running job's log lines are sent.
	logFlushInterval = 250 * time.Millisecond
)

// Queue is where a runner takes its jobs and sends their events: the
// site's Redis (*queue.Redis: asynq, and the site's event stream), or the
// site's dispatcher (package dispatch), which holds the queue for its
// nodes and pushes each node its work.
type Queue interface {
	Work(ctx context.Context, cfg queue.WorkerConfig, h queue.Handler) error
	Publish(ctx context.Context, site string, events ...job.Event) error
	Ping(ctx context.Context) error
}

var _ Queue = (*queue.Redis)(nil)

// Params are a Runner's dependencies and settings.
type Params struct {
	Site    string             // required
	Node    string             // required: this node's ID
	Redis   Queue              // required: the site's Redis, or its dispatcher
	Trust   verify.TrustSource // required: *ledger.TrustCache
	Scripts Scripts            // required: a *sandbox.Pool (or a *scripts.Engine, in tests)
	Log     *slog.Logger       // required
	Metrics *prometheus.Registry
	// Concurrency is how many jobs run at once; zero means DefaultConcurrency.
	Concurrency int
	// PollInterval: see queue.WorkerConfig; zero means its default.
	PollInterval time.Duration
	// ShutdownTimeout: see queue.WorkerConfig; zero means its default.
	ShutdownTimeout time.Duration
	// Dequeuers: see queue.WorkerConfig; zero means its default.
	Dequeuers int
	// Secrets opens jobs' sealed secrets with this node's key; nil: a job
	// with secrets is retried (another node may open them).
	Secrets *seal.Opener
	// Nodes looks up the nodes that signed a flow step's inputs
	// (required: *ledger.NodeCache).
	Nodes verify.NodeSource
	// Key is this node's key (Node is its ID): it signs the outputs of the
	// flow steps it runs, so the runners of their dependents can tell that
	// neither Redis nor coord changed them. nil: outputs go unsigned.
	Key *keys.Key
	// UnsignedInputs lets a step read inputs no node signed (in a fleet
	// of runners without node keys); signatures carried are still checked.
	UnsignedInputs bool
	Now            func() time.Time // optional, time.Now
}

// Scripts runs job scripts: *sandbox.Pool (package scripts/sandbox), or *scripts.Engine in
// process (tests).
type Scripts interface {
	Run(ctx context.Context, script string, in scripts.Input) (scripts.Output, error)
}

// Runner takes and runs jobs.
type Runner struct {
	p       Params
	stop    context.CancelCauseFunc // ends Run (set by Run)
	jobs    *prometheus.CounterVec
	runTime prometheus.Histogram
	running prometheus.Gauge
}

// New returns a Runner.
func New(p Params) (*Runner, error) {
	if !envelope.ValidSite(p.Site) || !envelope.ValidNode(p.Node) {
		return nil, fmt.Errorf("runner: invalid site %q or node %q", p.Site, p.Node)
	}
	if p.Redis == nil || p.Trust == nil || p.Nodes == nil || p.Scripts == nil || p.Log == nil {
		return nil, errors.New("runner: Redis, Trust, Nodes, Scripts and Log are required")
	}
	if p.Key != nil && ledger.NodeID(p.Key.Public) != p.Node {
		return nil, fmt.Errorf("runner: node %s is not the ID of its key (%s)", p.Node, ledger.NodeID(p.Key.Public))
	}
	if p.Concurrency == 0 {
		p.Concurrency = DefaultConcurrency
	}
	if p.Now == nil {
		p.Now = time.Now
	}
	if p.Metrics == nil {
		p.Metrics = prometheus.NewRegistry()
	}
	r := &Runner{p: p}
	r.jobs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "writ_runner_jobs_total", Help: "Job runs finished on this node, by outcome and reason.",
	}, []string{"site", "outcome", "reason"})
	r.runTime = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "writ_runner_run_seconds", Help: "Script run durations.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 4, 12),
	})
	r.running = prometheus.NewGauge(prometheus.GaugeOpts{Name: "writ_runner_running_jobs", Help: "Jobs running now."})
	p.Metrics.MustRegister(r.jobs, r.runTime, r.running)
	return r, nil
}

// Run takes jobs until ctx ends, then stops taking new ones and gives
// running ones ShutdownTimeout to finish. Alongside, the reaper reports
// jobs lost with a stopped runner.
func (r *Runner) Run(ctx context.Context) error {
	r.p.Log.Info("runner started", "concurrency", r.p.Concurrency)
	ctx, r.stop = context.WithCancelCause(ctx)
	defer r.stop(nil)
	g, ctx := errgroup.WithContext(ctx)
	// The reaper reads asynq's archive, in the site's Redis; a dispatcher
	// holds the tasks of its nodes, and recovers them itself.
	if rdb, ok := r.p.Redis.(*queue.Redis); ok {
		g.Go(func() error { return (&reaper{r: r, rdb: rdb, interval: reapInterval}).run(ctx) })
	}
	g.Go(func() error { return r.work(ctx) })
	g.Go(func() error { r.watchRevocation(ctx); return nil })
	err := g.Wait()
	if cause := context.Cause(ctx); errors.Is(cause, ErrNodeRevoked) {
		return cause
	}
	return err
}

// watchRevocation stops the runner once its site's trust snapshot lists
// this node as revoked (the snapshot is cached: checking costs nothing).
func (r *Runner) watchRevocation(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if tr, err := r.p.Trust.Get(ctx, r.p.Site); err == nil && tr.NodeRevoked(r.p.Node) {
				r.p.Log.Error("this node is revoked: stopping", "node", r.p.Node)
				r.stop(ErrNodeRevoked)
				return
			}
		}
	}
}

// ErrNodeRevoked ends a runner whose node an admin revoked.
var ErrNodeRevoked = errors.New("this node is revoked in the ledger: it takes no more work")

func (r *Runner) work(ctx context.Context) error {
	return r.p.Redis.Work(ctx, queue.WorkerConfig{
		Site: r.p.Site,
		// asynq tries queues one at a time in weighted random order, one
		// round trip each. The node queue is usually empty, so trying the
		// site queue first more often saves a round trip per job; pinned
		// jobs still get a third of the dequeues when both have work.
		Queues:          map[string]int{queue.NodeQueue(r.p.Node): 1, queue.SiteQueue(r.p.Site): 2},
		Concurrency:     r.p.Concurrency,
		PollInterval:    r.p.PollInterval,
		ShutdownTimeout: r.p.ShutdownTimeout,
		Dequeuers:       r.p.Dequeuers,
		Log:             r.p.Log,
	}, r.handle)
}

// Ready checks the runner's Redis.
func (r *Runner) Ready(ctx context.Context) error { return r.p.Redis.Ping(ctx) }

// Metrics returns the registry the runner reports to.
func (r *Runner) Metrics() *prometheus.Registry { return r.p.Metrics }

// failure is a classified failure of a run.
type failure struct {
	outcome queue.Outcome
	reason  job.Reason
	err     error
}

func fail(reason job.Reason, err error) *failure  { return &failure{queue.Fail, reason, err} }
func retry(reason job.Reason, err error) *failure { return &failure{queue.Retry, reason, err} }

// handle runs one delivery and reports it.
func (r *Runner) handle(ctx context.Context, d queue.Delivery) (err error) {
	r.running.Inc()
	defer r.running.Dec()
	rep := &reporter{r: r, d: d}
	defer func() {
		if p := recover(); p != nil {
			err = rep.finish(nil, fail(job.ReasonPanic, fmt.Errorf("panic: %v at %s", p, stack.PanicSite())))
		}
	}()
	// A revoked node takes no more work: this job goes back (another node
	// runs it) and the runner stops.
	if t, err := r.p.Trust.Get(ctx, r.p.Site); err == nil && t.NodeRevoked(r.p.Node) {
		r.p.Log.Error("this node is revoked: stopping", "node", r.p.Node)
		if r.stop != nil {
			r.stop(ErrNodeRevoked)
		}
		return rep.finish(nil, retry(job.ReasonNodeRevoked, ErrNodeRevoked))
	}
	c, step, f := r.verify(ctx, d)
	if f != nil {
		return rep.finish(nil, f)
	}
	spec := c.Job
	attempt := d.Attempt
	var inputs, item []byte
	if step != nil {
		// A flow's step: its run number is the flow's, and it reads its
		// dependencies' outputs and its fan-out element; its output is
		// signed.
		attempt, inputs, item = step.Attempt, step.Inputs, step.Value
		rep.sign = r.p.Key != nil
	}
	// Secrets are opened here, just before the run, and never reported:
	// every event and error the run produces has their values redacted.
	secrets, err := r.p.Secrets.OpenAll(spec.Secrets)
	if err != nil {
		if errors.Is(err, seal.ErrNotRecipient) || r.p.Secrets == nil {
			return rep.finish(nil, retry(job.ReasonSecretSealed, fmt.Errorf("%w (another node of the site may run it)", err)))
		}
		return rep.finish(nil, fail(job.ReasonSecretInvalid, err))
	}
	rep.secrets = secrets
	rep.emit(job.Event{Type: job.EventStarted, Node: r.p.Node, Attempt: d.Attempt, Name: spec.Name})

	runCtx, cancel := scripts.WithTimeout(ctx, spec.RunTimeout())
	defer cancel()
	stopFlush := rep.flushLoop()
	start := time.Now()
	out, runErr := r.p.Scripts.Run(runCtx, spec.Script, scripts.Input{
		JobID: d.ID, Name: spec.Name, Site: r.p.Site, Node: r.p.Node,
		Args: spec.Args, Attempt: attempt, Log: rep.log, Secrets: secrets,
		Owner: c.Owner, Admin: c.Admin, MaxMemory: c.ScriptMemory,
		Inputs: inputs, Item: item,
	})
	r.runTime.Observe(time.Since(start).Seconds())
	stopFlush()
	if runErr != nil {
		if ctx.Err() != nil && r.cancelled(d.ID) {
			// asynq's cancel ended the run: the job was cancelled, not
			// this runner stopped.
			return rep.finish(nil, fail(job.ReasonCancelled, fmt.Errorf("cancelled while it ran: %w", runErr)))
		}
		return rep.finish(nil, classify(ctx, runErr))
	}
	return rep.finish(out.Result, nil)
}

// cancelled reports whether job id was cancelled (queue.CancelJob, or
// the dispatcher's word on the node's stream); a queue that cannot tell
// says no.
func (r *Runner) cancelled(id string) bool {
	cq, ok := r.p.Redis.(interface {
		CancelRequested(ctx context.Context, site, id string) (bool, error)
	})
	if !ok {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	yes, err := cq.CancelRequested(ctx, r.p.Site, id)
	return err == nil && yes
}

// verify checks the delivery as the supervisor did (verify.Job, or
// verify.StepJob for a step of a flow), and that it is this node's to run
// and the queue entry carries the envelope it names. A ledger it cannot
// reach is retried; every refusal is final.
func (r *Runner) verify(ctx context.Context, d queue.Delivery) (*verify.Checked, *verify.Step, *failure) {
	t := verify.Target{Site: r.p.Site, Node: r.p.Node, ID: d.ID, Nodes: r.p.Nodes, UnsignedInputs: r.p.UnsignedInputs}
	var c *verify.Checked
	var step *verify.Step
	task, isStep, err := verify.ParseStepTask(d.Envelope)
	switch {
	case isStep && err == nil:
		c, step, err = verify.StepJob(ctx, r.p.Trust, task, t, r.p.Now())
	case !isStep:
		_, c, err = verify.Job(ctx, r.p.Trust, d.Envelope, t, r.p.Now())
	}
	if verify.Retry(err) {
		return nil, nil, retry(job.ReasonLedgerUnavailable, err)
	}
	if err != nil {
		return nil, nil, fail(verify.Reason(err), err)
	}
	return c, step, nil
}

// classify sorts a script failure into retry or fail.
func classify(ctx context.Context, err error) *failure {
	switch {
	case ctx.Err() != nil:
		// The runner is shutting down: run the job again elsewhere.
		return retry(job.ReasonShutdown, fmt.Errorf("runner stopped during the run: %w", err))
	case errors.Is(err, scripts.ErrTimeout):
		return fail(job.ReasonTimeout, err)
	case errors.Is(err, scripts.ErrAllocLimit):
		return fail(job.ReasonAllocLimit, err)
	case errors.Is(err, scripts.ErrMemoryLimit):
		return fail(job.ReasonMemoryLimit, err)
	case errors.Is(err, scripts.ErrStackOverflow):
		return fail(job.ReasonStackOverflow, err)
	case errors.Is(err, scripts.ErrCycle):
		return fail(job.ReasonCycle, err)
	case errors.Is(err, scripts.ErrResultTooLarge):
		return fail(job.ReasonResultTooLarge, err)
	case errors.Is(err, scripts.ErrSandbox):
		return fail(job.ReasonSandboxFailed, err)
	case errors.Is(err, scripts.ErrTransient):
		return retry(job.ReasonTransient, err)
	}
	if reason := envelope.ReasonOf(err); reason != "" {
		return fail(reason, err)
	}
	return fail(job.ReasonScriptError, err)
}

// reporter collects a run's events and sends them on the site stream.
type reporter struct {
	r       *Runner
	d       queue.Delivery
	secrets map[string]string // opened secrets: redacted from every event
	sign    bool              // sign the result (a flow step's output) with the node's key

	mu      sync.Mutex
	pending []job.Event // guarded by mu
}

func (rep *reporter) emit(ev job.Event) {
	ev.Job, ev.Site = rep.d.ID, rep.r.p.Site
	if len(rep.secrets) > 0 {
		ev.Message, ev.Error = seal.Redact(ev.Message, rep.secrets), seal.Redact(ev.Error, rep.secrets)
		if len(ev.Result) > 0 {
			ev.Result = []byte(seal.Redact(string(ev.Result), rep.secrets))
		}
	}
	if ev.At.IsZero() {
		ev.At = rep.r.p.Now()
	}
	rep.mu.Lock()
	rep.pending = append(rep.pending, ev)
	rep.mu.Unlock()
	// Nothing is sent here: a job that ends within logFlushInterval sends
	// started and its end in one round trip; a longer one has started sent
	// by the flush loop.
}

func (rep *reporter) log(level, line string) {
	rep.emit(job.Event{Type: job.EventLog, Level: level, Message: line, Attempt: rep.d.Attempt})
}

// flush sends pending events. Publishing must finish even when the job's
// context has ended (a timed-out or cancelled job still reports), hence a
// context of its own, not derived from the job's, with its own bound.
func (rep *reporter) flush() {
	rep.mu.Lock()
	evs := rep.pending
	rep.pending = nil
	rep.mu.Unlock()
	if len(evs) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var err error
	for try := 0; try < 5; try++ {
		if err = rep.r.p.Redis.Publish(ctx, rep.r.p.Site, evs...); err == nil {
			return
		}
		time.Sleep(time.Duration(100<<try) * time.Millisecond)
	}
	rep.r.p.Log.Error("publish job events", "job", rep.d.ID, "events", len(evs), "err", err)
}

// flushLoop sends log lines while the script runs; the returned func stops it.
func (rep *reporter) flushLoop() func() {
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(logFlushInterval)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				rep.flush()
			}
		}
	}()
	return func() { close(done); <-stopped }
}

// finish reports the end of a run and returns what the worker server needs:
// nil, a retryable error, or a NoRetry error.
func (rep *reporter) finish(result []byte, f *failure) error {
	r := rep.r
	if f != nil && len(rep.secrets) > 0 {
		// asynq keeps the error text in Redis, and the log keeps it too.
		f.err = errors.New(seal.Redact(f.err.Error(), rep.secrets))
	}
	var sig []byte
	if f == nil && rep.sign {
		// Signed as it is reported: secrets redacted first.
		if len(rep.secrets) > 0 && len(result) > 0 {
			result = []byte(seal.Redact(string(result), rep.secrets))
		}
		var err error
		if sig, err = envelope.SignOutput(r.p.Key.Private, rep.d.ID, result); err != nil {
			f = fail(job.ReasonResultInvalid, err)
		}
	}
	if f == nil {
		rep.emit(job.Event{Type: job.EventSucceeded, Node: r.p.Node, Attempt: rep.d.Attempt, Result: result, ResultSig: sig})
		rep.flush()
		r.jobs.WithLabelValues(r.p.Site, "succeeded", "").Inc()
		return nil
	}
	log := r.p.Log.With("job", rep.d.ID, "attempt", rep.d.Attempt, "reason", f.reason, "err", f.err)
	if f.outcome == queue.Retry && !rep.d.LastAttempt() {
		rep.emit(job.Event{Type: job.EventRetrying, Node: r.p.Node, Attempt: rep.d.Attempt, Reason: f.reason, Error: f.err.Error()})
		rep.flush()
		r.jobs.WithLabelValues(r.p.Site, "retrying", string(f.reason)).Inc()
		log.Warn("job run failed; will retry")
		return f.err
	}
	rep.emit(job.Event{Type: job.EventFailed, Node: r.p.Node, Attempt: rep.d.Attempt, Reason: f.reason, Error: f.err.Error()})
	rep.flush()
	r.jobs.WithLabelValues(r.p.Site, "failed", string(f.reason)).Inc()
	log.Info("job failed")
	return queue.NoRetry(f.err)
}

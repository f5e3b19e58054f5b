package coord

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/flow"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/verify"
)

// flowEngine is coord's duty of running flows: it keeps each flow's
// progress (flow.Run) in coord's Redis, starts the jobs the DAG allows as
// step tasks through the same forwarders as jobs, and advances the flow as
// their ends are applied. Every change is a compare-and-set on the flow's
// version, and the jobs an update starts are recorded with it, so a coord
// that dies mid-flow leaves a flow that the next sweep resumes: a step
// whose job ended is advanced, one whose job was never recorded is
// submitted again (its derived ID makes a second submission a duplicate,
// never a second run).
//
// Its work arrives three ways, all run under run's context: step ends the
// followers applied (ended, queued and applied by one loop), requests of
// the API (advance and update, on the request's context), and the sweep,
// which one coord at a time runs under a lease.
type flowEngine struct {
	p     flowEngineParams
	local flowLocal // this coord's locks and parsed copies of flows

	ends    chan []job.Event // step ends to apply, from the followers
	changes chan string      // flows whose streams to wake
}

// flowEngineParams are what the flow engine uses.
type flowEngineParams struct {
	redis *queue.Redis // required
	// submit hands a step's job to its site's forwarder and returns the
	// supervisor's verdict. Required.
	submit func(ctx context.Context, site string, sub *submission) (job.Verdict, error)
	// notify wakes the streams of flows ids, here and at the other coords.
	// Required.
	notify func(ctx context.Context, ids []string)
	// leased runs fn while this coord holds the lease called name
	// (Coord.leased). Required.
	leased    func(ctx context.Context, name string, fn func(context.Context))
	log       *slog.Logger     // required
	now       func() time.Time // required
	retention time.Duration
}

// Bounds of the flow engine.
const (
	// flowSweepInterval is how often the flow sweep runs.
	flowSweepInterval = 10 * time.Second
	// flowEndsQueue bounds the batches of step ends waiting to be applied;
	// past it a batch is left to the sweep (which finds every end).
	flowEndsQueue = 1024
	// flowChangesQueue bounds the flows waiting for their streams to be
	// woken; past it a wake-up is dropped (streams re-read every 2 s).
	flowChangesQueue = 4096
	// flowEndsTimeout bounds applying one batch of ends.
	flowEndsTimeout = time.Minute
)

func newFlowEngine(p flowEngineParams) *flowEngine {
	return &flowEngine{p: p, ends: make(chan []job.Event, flowEndsQueue), changes: make(chan string, flowChangesQueue)}
}

// run applies step ends, wakes flows' streams and (holding the lease)
// sweeps, until ctx ends. Shutdown: ends still queued are left to the
// next sweep (they are applied to the jobs' records already).
func (e *flowEngine) run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case evs := <-e.ends:
				actx, cancel := context.WithTimeout(ctx, flowEndsTimeout)
				e.applyEnds(actx, evs)
				cancel()
			}
		}
	})
	g.Go(func() error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case id := <-e.changes:
				ids := []string{id}
			coalesce: // what queued meanwhile goes in the same notice
				for len(ids) < 256 {
					select {
					case more := <-e.changes:
						ids = append(ids, more)
					default:
						break coalesce
					}
				}
				e.p.notify(ctx, ids)
			}
		}
	})
	g.Go(func() error {
		// One coord at a time resumes flows a crash or a lost end left.
		e.p.leased(ctx, "flows", func(ctx context.Context) {
			t := time.NewTicker(flowSweepInterval)
			defer t.Stop()
			for {
				e.sweep(ctx)
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
		})
		return nil
	})
	return g.Wait()
}

// ended queues the ends among evs (terminal events, of step jobs or not)
// for run to apply. It never blocks: the follower that calls it goes on,
// and a batch the queue cannot take is left to the sweep. evs is copied.
func (e *flowEngine) ended(evs []job.Event) {
	var ends []job.Event
	for _, ev := range evs {
		if ev.Type.Terminal() {
			ends = append(ends, ev)
		}
	}
	if len(ends) == 0 {
		return
	}
	select {
	case e.ends <- ends:
	default:
		e.p.log.Warn("flow engine busy: step ends left to the sweep", "ends", len(ends))
	}
}

// changed queues flow id's streams to be woken; it never blocks.
func (e *flowEngine) changed(id string) {
	select {
	case e.changes <- id:
	default:
	}
}

// advance applies ends to flow id and starts what may start. Ends that
// arrive while an update of the flow is under way are applied together by
// the next one (a fan-out's items end together: one update, not one
// each).
func (e *flowEngine) advance(ctx context.Context, id string, ends []stepEnd) error {
	var commit func()
	e.local.mu.Lock()
	if e.local.pending == nil {
		e.local.pending = map[string][]stepEnd{}
	}
	e.local.pending[id] = append(e.local.pending[id], ends...)
	e.local.mu.Unlock()
	return e.update(ctx, id, func() { commit() }, func(fl *envelope.Flow, run *flow.Run) ([]flow.Start, bool) {
		// Under the flow's lock: take every end waiting for it. A retry
		// after a conflict keeps those it took (they are in ends).
		had := len(ends) > 0
		e.local.mu.Lock()
		ends = append(ends[:0:0], e.local.pending[id]...)
		e.local.mu.Unlock()
		if had && len(ends) == 0 {
			return nil, false // an update while this one waited applied them
		}
		taken := len(ends)
		commit = func() {
			e.local.mu.Lock()
			if rest := e.local.pending[id][taken:]; len(rest) > 0 {
				e.local.pending[id] = rest
			} else {
				delete(e.local.pending, id)
			}
			e.local.mu.Unlock()
		}
		now := e.p.now()
		var starts []flow.Start
		for _, e := range ends {
			if again := run.Ended(fl, e.ref.Step, e.ref.Item, e.ref.Attempt, e.ok, e.output, e.proof, e.err, now); again != nil {
				starts = append(starts, *again)
			}
		}
		more, _ := run.Next(fl, now)
		return append(starts, more...), true
	})
}

// flowLocal is what one coord keeps of its flows: a lock per flow, so its
// own updates of one flow (the ends of a fan-out arrive together) do not
// race each other's compare-and-set, and the flows it parsed (a flow is
// immutable: its ID is its payload's hash).
type flowLocal struct {
	mu      sync.Mutex
	locks   map[string]*flowLock      // guarded by mu
	parsed  map[string]*envelope.Flow // guarded by mu; bounded by maxParsedFlows
	raw     map[string][]byte         // guarded by mu; the envelopes of parsed
	pending map[string][]stepEnd      // guarded by mu; ends not yet written, by flow
}

type flowLock struct {
	sync.Mutex
	users int // guarded by flowLocal.mu
}

const maxParsedFlows = 256

func (l *flowLocal) lock(id string) func() {
	l.mu.Lock()
	if l.locks == nil {
		l.locks = map[string]*flowLock{}
	}
	fl := l.locks[id]
	if fl == nil {
		fl = &flowLock{}
		l.locks[id] = fl
	}
	fl.users++
	l.mu.Unlock()
	fl.Lock()
	return func() {
		fl.Unlock()
		l.mu.Lock()
		if fl.users--; fl.users == 0 {
			delete(l.locks, id)
		}
		l.mu.Unlock()
	}
}

// parse returns the flow of envelope raw, whose ID is id.
func (l *flowLocal) parse(id string, raw []byte) (*envelope.Flow, error) {
	l.mu.Lock()
	fl := l.parsed[id]
	l.mu.Unlock()
	if fl != nil {
		return fl, nil
	}
	env, err := envelope.Decode(raw)
	if err != nil {
		return nil, err
	}
	if env.ID() != id {
		return nil, fmt.Errorf("flow %s: its record holds another envelope (%s)", id, env.ID())
	}
	if fl, err = env.Flow(); err != nil {
		return nil, err
	}
	l.mu.Lock()
	if l.parsed == nil || len(l.parsed) >= maxParsedFlows {
		l.parsed, l.raw = map[string]*envelope.Flow{}, map[string][]byte{}
	}
	l.parsed[id], l.raw[id] = fl, raw
	l.mu.Unlock()
	return fl, nil
}

// flowOf is flow id, parsed, from the parsed flows or its record.
func (e *flowEngine) flowOf(ctx context.Context, id string) (*envelope.Flow, error) {
	e.local.mu.Lock()
	fl := e.local.parsed[id]
	e.local.mu.Unlock()
	if fl != nil {
		return fl, nil
	}
	rec, err := e.p.redis.GetFlow(ctx, id)
	if err != nil {
		return nil, err
	}
	return e.local.parse(id, rec.Envelope)
}

// flowEnvelope is flow id's envelope, from the parsed flows or its record.
func (e *flowEngine) flowEnvelope(ctx context.Context, id string) ([]byte, error) {
	e.local.mu.Lock()
	raw := e.local.raw[id]
	e.local.mu.Unlock()
	if raw != nil {
		return raw, nil
	}
	rec, err := e.p.redis.GetFlow(ctx, id)
	if err != nil {
		return nil, err
	}
	if _, err := e.local.parse(id, rec.Envelope); err != nil {
		return nil, err
	}
	return rec.Envelope, nil
}

// update reads flow id, lets change update its progress and name the
// jobs to start, writes it if no one else did meanwhile (else reads it
// again), then submits those jobs.
// committed, if set, runs once the change is written, under the lock.
// change returns false to write nothing.
func (e *flowEngine) update(ctx context.Context, id string, committed func(), change func(*envelope.Flow, *flow.Run) ([]flow.Start, bool)) error {
	unlock := e.local.lock(id)
	locked := true
	defer func() {
		if locked {
			unlock()
		}
	}()
	for try := 0; try < 20; try++ {
		rec, err := e.p.redis.GetFlowProgress(ctx, id)
		if err != nil {
			return err
		}
		fl, err := e.flowOf(ctx, id)
		if err != nil {
			return err
		}
		var run flow.Run
		if err := json.Unmarshal(rec.Run, &run); err != nil {
			return fmt.Errorf("flow %s: progress: %w", id, err)
		}
		starts, write := change(fl, &run)
		if !write {
			return nil
		}
		refs := make(map[string]queue.StepRef, len(starts))
		for _, st := range starts {
			refs[envelope.StepJobID(id, st.Step, st.Item, st.Attempt)] = queue.StepRef{Flow: id, Step: st.Step, Item: st.Item, Attempt: st.Attempt}
		}
		b, _ := json.Marshal(&run)
		if _, err := e.p.redis.UpdateFlow(ctx, id, rec.Version, b, run.Done(), refs, e.p.retention); errors.Is(err, queue.ErrFlowConflict) {
			continue
		} else if err != nil {
			return err
		}
		if committed != nil {
			committed()
		}
		if run.Done() {
			e.p.log.Info("flow ended", "flow", id, "state", run.State)
		}
		e.changed(id)
		// Submitted outside the lock: a refused step advances the flow
		// again.
		unlock()
		locked = false
		return e.submitSteps(ctx, rec, fl, starts)
	}
	return fmt.Errorf("flow %s: too many concurrent updates", id)
}

// submitSteps sends started steps to their sites. A step its supervisor
// refuses ends failed at once.
func (e *flowEngine) submitSteps(ctx context.Context, rec *queue.FlowRecord, fl *envelope.Flow, starts []flow.Start) error {
	var (
		mu       sync.Mutex
		refused  []stepEnd
		firstErr error
	)
	// Together, so the forwarder sends a fan-out in a few batches.
	var g errgroup.Group
	g.SetLimit(64)
	for _, st := range starts {
		g.Go(func() error {
			s := fl.Step(st.Step)
			// Recorded naming the flow (its envelope is in the flow's record,
			// once); post puts it back for the supervisor.
			task, _ := verify.RefStepTask(verify.StepTask{Step: st.Step, Item: st.Item, Attempt: st.Attempt, Value: st.Value, Inputs: st.Inputs, Proofs: st.Proofs}, rec.ID)
			id := envelope.StepJobID(rec.ID, st.Step, st.Item, st.Attempt)
			site := fl.SiteOf(s)
			name := fl.Name + "/" + st.Step
			if len(s.ForEach) > 0 {
				name = fmt.Sprintf("%s[%d]", name, st.Item)
			}
			sub := &submission{
				rec:  queue.NewJobRecord{Job: job.Record{ID: id, Name: name, Site: site, Node: s.Node, SubmittedAt: e.p.now(), Users: rec.Users}, Envelope: task},
				done: make(chan job.Verdict, 1),
			}
			v, err := e.p.submit(ctx, site, sub)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				// Recorded with the flow: the sweep submits it again.
				if firstErr == nil {
					firstErr = fmt.Errorf("submit step %s: %w", id, err)
				}
			case v.State == job.VerdictRejected && !v.Retry:
				refused = append(refused, stepEnd{ref: queue.StepRef{Flow: rec.ID, Step: st.Step, Item: st.Item, Attempt: st.Attempt},
					err: fmt.Sprintf("refused by the supervisor of %s: %s: %s", site, v.Reason, v.Error)})
			}
			return nil
		})
	}
	g.Wait()
	if len(refused) > 0 {
		if err := e.advance(ctx, rec.ID, refused); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	return firstErr
}

// applyEnds advances the flows whose step jobs evs ended.
func (e *flowEngine) applyEnds(ctx context.Context, evs []job.Event) {
	var ids []string
	byID := map[string]job.Event{}
	for _, ev := range evs {
		if ev.Type.Terminal() {
			ids = append(ids, ev.Job)
			byID[ev.Job] = ev
		}
	}
	if len(ids) == 0 {
		return
	}
	refs, ok, err := e.p.redis.FlowSteps(ctx, ids...)
	if err != nil {
		e.p.log.Warn("look up flow steps (the sweep advances their flows)", "err", err)
		return
	}
	perFlow := map[string][]stepEnd{}
	for i, id := range ids {
		if !ok[i] {
			continue
		}
		ev := byID[id]
		perFlow[refs[i].Flow] = append(perFlow[refs[i].Flow], stepEnd{ref: refs[i], ok: ev.Type == job.EventSucceeded, output: ev.Result,
			proof: proofOf(refs[i].Attempt, ev.Node, ev.ResultSig), err: ev.Error})
	}
	for flowID, ends := range perFlow {
		e.p.log.Debug("step ends", "flow", flowID, "ends", len(ends))
		if err := e.advance(ctx, flowID, ends); err != nil {
			e.p.log.Warn("advance flow (the sweep will)", "flow", flowID, "err", err)
		}
	}
}

// sweep resumes every flow that has not ended: the ends of its
// running steps' jobs are applied (an end coord applied but did not pass
// on, a coord killed in between), steps whose jobs coord has no record of
// are submitted again, and what may start, starts.
func (e *flowEngine) sweep(ctx context.Context) {
	ids, err := e.p.redis.ActiveFlows(ctx, 1000)
	if err != nil {
		e.p.log.Warn("flow sweep", "err", err)
		return
	}
	for _, id := range ids {
		rec, err := e.p.redis.GetFlowProgress(ctx, id)
		if errors.Is(err, queue.ErrNoFlow) {
			e.p.redis.DropActiveFlow(ctx, id)
			continue
		}
		if err != nil {
			continue
		}
		var run flow.Run
		if json.Unmarshal(rec.Run, &run) != nil || run.Done() {
			continue
		}
		fl, err := e.flowOf(ctx, id)
		if err != nil {
			continue
		}
		var ends []stepEnd
		var lost []flow.Start
		for _, st := range run.Running(fl) {
			jid := envelope.StepJobID(id, st.Step, st.Item, st.Attempt)
			j, err := e.p.redis.GetJob(ctx, jid)
			switch {
			case errors.Is(err, queue.ErrNoJob):
				lost = append(lost, e.restart(fl, &run, st))
			case err != nil:
			case j.State.Terminal():
				ends = append(ends, stepEnd{ref: queue.StepRef{Flow: id, Step: st.Step, Item: st.Item, Attempt: st.Attempt},
					ok: j.State == job.StateSucceeded, output: j.Result, proof: proofOf(st.Attempt, j.Node, j.ResultSig), err: j.Error})
			}
		}
		if len(lost) > 0 {
			if err := e.submitSteps(ctx, rec, fl, lost); err != nil {
				e.p.log.Warn("flow sweep: submit", "flow", id, "err", err)
			}
		}
		if err := e.advance(ctx, id, ends); err != nil {
			e.p.log.Warn("flow sweep: advance", "flow", id, "err", err)
		}
	}
}

// restart rebuilds the start of a running item whose job coord never
// recorded: its value and inputs, as Next gave them.
func (e *flowEngine) restart(fl *envelope.Flow, run *flow.Run, st flow.Start) flow.Start {
	sr := run.Steps[st.Step]
	if fl.Finally != nil && st.Step == fl.Finally.Name {
		sr = run.Finally
	}
	st.Value = sr.Items[st.Item].Value
	st.Inputs, st.Proofs = run.InputsOf(fl, fl.Step(st.Step))
	return st
}

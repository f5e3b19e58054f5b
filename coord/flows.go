package coord

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"
	"golang.org/x/sync/errgroup"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/flow"
	"github.com/writ-fleet/writ/internal/httpapi"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/verify"
)

// coord runs flows: it keeps each flow's progress (flow.Run) in its Redis,
// starts the jobs the DAG allows as step tasks through the same forwarders
// as jobs, and advances the flow as their ends are applied. Every change
// is a compare-and-set on the flow's version, and the jobs an update
// starts are recorded with it, so a coord that dies mid-flow leaves a
// flow that the next sweep resumes: a step whose job ended is advanced, one
// whose job was never recorded is submitted again (its derived ID makes a
// second submission a duplicate, never a second run).

// FlowReply is what POST /v1/flows and GET /v1/flows/{id} answer.
type FlowReply struct {
	ID      string                     `json:"id"`
	Name    string                     `json:"name"`
	State   string                     `json:"state"`
	Reason  string                     `json:"reason,omitempty"`
	Error   string                     `json:"error,omitempty"`
	Run     *flow.Run                  `json:"run,omitempty"`
	Outputs map[string]json.RawMessage `json:"outputs,omitempty"`
}

// flowSweepInterval is how often the flow sweep runs.
const flowSweepInterval = 10 * time.Second

// stepEnd is one step job's end, as applied.
type stepEnd struct {
	ref    queue.StepRef
	ok     bool
	output json.RawMessage
	proof  *envelope.OutputProof // the node's signature over output, if it signed
	err    string
}

// proofOf is the output proof of step job run attempt that node ended
// with sig (nil if it did not sign).
func proofOf(attempt int, node string, sig []byte) *envelope.OutputProof {
	if len(sig) == 0 {
		return nil
	}
	return &envelope.OutputProof{Attempt: attempt, Node: node, Sig: sig}
}

func (c *Coord) postFlow(w http.ResponseWriter, r *http.Request) {
	body, err := httpapi.ReadBody(r, envelope.MaxFlowBytes+envelope.MaxFlowBytes/2)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	refuse := func(id string, err error) {
		httpapi.JSON(w, job.Status(job.Verdict{State: job.VerdictRejected, Reason: string(envelope.ReasonOf(err))}),
			FlowReply{ID: id, State: job.VerdictRejected, Reason: string(envelope.ReasonOf(err)), Error: err.Error()})
	}
	env, err := envelope.Decode(body)
	if err != nil {
		refuse("", err)
		return
	}
	id := env.ID()
	fl, err := env.Flow()
	if err != nil {
		refuse(id, err)
		return
	}
	// Every site the flow runs on must accept its signatures before
	// anything runs (verify.Flow, as the supervisor and runner judge its
	// steps): a flow below one site's threshold starts nothing.
	checked, err := verify.Flow(r.Context(), c.p.Trust, env, fl, c.p.Now())
	if verify.Retry(err) {
		httpapi.Fail(w, httpapi.Errorf(http.StatusServiceUnavailable, "%v", err))
		return
	} else if err != nil {
		refuse(id, err)
		return
	}
	users := checked.Signers
	run, _ := json.Marshal(flow.NewRun(fl))
	if _, err := c.p.Redis.CreateFlow(r.Context(), queue.FlowRecord{ID: id, Name: fl.Name, Envelope: body, Users: users, Submitted: c.p.Now(), Run: run}, c.p.Retention); err != nil {
		httpapi.Fail(w, httpapi.Errorf(http.StatusServiceUnavailable, "record flow: %v", err))
		return
	}
	if err := c.advanceFlow(r.Context(), id, nil); err != nil {
		// Recorded: the sweep starts it.
		c.p.Log.Warn("flow recorded, not yet started (the sweep will)", "flow", id, "err", err)
	}
	rec, err := c.p.Redis.GetFlowProgress(r.Context(), id)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	httpapi.JSON(w, http.StatusAccepted, flowReply(rec))
}

func (c *Coord) getFlow(w http.ResponseWriter, r *http.Request) {
	rec, err := c.readableFlow(r)
	if err != nil {
		failFlow(w, err)
		return
	}
	httpapi.JSON(w, http.StatusOK, flowReply(rec))
}

func (c *Coord) cancelFlow(w http.ResponseWriter, r *http.Request) {
	rec, err := c.readableFlow(r)
	if err == nil {
		err = c.updateFlow(r.Context(), rec.ID, nil, func(fl *envelope.Flow, run *flow.Run) ([]flow.Start, bool) {
			run.Cancel(c.p.Now())
			return nil, true
		})
	}
	if err == nil {
		c.cancelRunning(r.Context(), rec.ID)
		rec, err = c.p.Redis.GetFlowProgress(r.Context(), rec.ID)
	}
	if err != nil {
		failFlow(w, err)
		return
	}
	httpapi.JSON(w, http.StatusOK, flowReply(rec))
}

func (c *Coord) listFlows(w http.ResponseWriter, r *http.Request) {
	p := principalOf(r.Context())
	ids, err := c.p.Redis.ListFlows(r.Context(), p.user, 100)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	out := []FlowReply{}
	for _, id := range ids {
		if rec, err := c.p.Redis.GetFlowProgress(r.Context(), id); err == nil {
			rep := flowReply(rec)
			rep.Run, rep.Outputs = nil, nil
			out = append(out, rep)
		}
	}
	httpapi.JSON(w, http.StatusOK, out)
}

// readableFlow is the flow of the request's {id}, if its caller signed it.
func (c *Coord) readableFlow(r *http.Request) (*queue.FlowRecord, error) {
	rec, err := c.p.Redis.GetFlowProgress(r.Context(), chi.URLParam(r, "id"))
	if err != nil {
		return nil, err
	}
	if !slices.Contains(rec.Users, principalOf(r.Context()).user) {
		return nil, queue.ErrNoFlow // another's flow is as unknown as a missing one
	}
	return rec, nil
}

func failFlow(w http.ResponseWriter, err error) {
	if errors.Is(err, queue.ErrNoFlow) {
		httpapi.Fail(w, &httpapi.Error{Status: http.StatusNotFound, Reason: "not_found", Msg: "no such flow"})
		return
	}
	httpapi.Fail(w, err)
}

func flowReply(rec *queue.FlowRecord) FlowReply {
	rep := FlowReply{ID: rec.ID, Name: rec.Name}
	var run flow.Run
	if json.Unmarshal(rec.Run, &run) == nil {
		rep.State, rep.Run = run.State, &run
		rep.Outputs = run.Outputs()
		if run.Error != "" {
			rep.Error = run.Error
		}
	}
	return rep
}

// advanceFlow applies ends to flow id and starts what may start. Ends that
// arrive while an update of the flow is under way are applied together by
// the next one (a fan-out's items end together: one update, not one
// each).
func (c *Coord) advanceFlow(ctx context.Context, id string, ends []stepEnd) error {
	var commit func()
	c.flows.mu.Lock()
	if c.flows.pending == nil {
		c.flows.pending = map[string][]stepEnd{}
	}
	c.flows.pending[id] = append(c.flows.pending[id], ends...)
	c.flows.mu.Unlock()
	return c.updateFlow(ctx, id, func() { commit() }, func(fl *envelope.Flow, run *flow.Run) ([]flow.Start, bool) {
		// Under the flow's lock: take every end waiting for it. A retry
		// after a conflict keeps those it took (they are in ends).
		had := len(ends) > 0
		c.flows.mu.Lock()
		ends = append(ends[:0:0], c.flows.pending[id]...)
		c.flows.mu.Unlock()
		if had && len(ends) == 0 {
			return nil, false // an update while this one waited applied them
		}
		taken := len(ends)
		commit = func() {
			c.flows.mu.Lock()
			if rest := c.flows.pending[id][taken:]; len(rest) > 0 {
				c.flows.pending[id] = rest
			} else {
				delete(c.flows.pending, id)
			}
			c.flows.mu.Unlock()
		}
		now := c.p.Now()
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
func (c *Coord) flowOf(ctx context.Context, id string) (*envelope.Flow, error) {
	c.flows.mu.Lock()
	fl := c.flows.parsed[id]
	c.flows.mu.Unlock()
	if fl != nil {
		return fl, nil
	}
	rec, err := c.p.Redis.GetFlow(ctx, id)
	if err != nil {
		return nil, err
	}
	return c.flows.parse(id, rec.Envelope)
}

// flowEnvelope is flow id's envelope, from the parsed flows or its record.
func (c *Coord) flowEnvelope(ctx context.Context, id string) ([]byte, error) {
	c.flows.mu.Lock()
	raw := c.flows.raw[id]
	c.flows.mu.Unlock()
	if raw != nil {
		return raw, nil
	}
	rec, err := c.p.Redis.GetFlow(ctx, id)
	if err != nil {
		return nil, err
	}
	if _, err := c.flows.parse(id, rec.Envelope); err != nil {
		return nil, err
	}
	return rec.Envelope, nil
}

// updateFlow reads flow id, lets change update its progress and name the
// jobs to start, writes it if no one else did meanwhile (else reads it
// again), then submits those jobs.
// committed, if set, runs once the change is written, under the lock.
// change returns false to write nothing.
func (c *Coord) updateFlow(ctx context.Context, id string, committed func(), change func(*envelope.Flow, *flow.Run) ([]flow.Start, bool)) error {
	unlock := c.flows.lock(id)
	locked := true
	defer func() {
		if locked {
			unlock()
		}
	}()
	for try := 0; try < 20; try++ {
		rec, err := c.p.Redis.GetFlowProgress(ctx, id)
		if err != nil {
			return err
		}
		fl, err := c.flowOf(ctx, id)
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
		if _, err := c.p.Redis.UpdateFlow(ctx, id, rec.Version, b, run.Done(), refs, c.p.Retention); errors.Is(err, queue.ErrFlowConflict) {
			continue
		} else if err != nil {
			return err
		}
		if committed != nil {
			committed()
		}
		if run.Done() {
			c.p.Log.Info("flow ended", "flow", id, "state", run.State)
		}
		go c.flowChanged(id)
		// Submitted outside the lock: a refused step advances the flow
		// again.
		unlock()
		locked = false
		return c.submitSteps(ctx, rec, fl, starts)
	}
	return fmt.Errorf("flow %s: too many concurrent updates", id)
}

// submitSteps sends started steps to their sites. A step its supervisor
// refuses ends failed at once.
func (c *Coord) submitSteps(ctx context.Context, rec *queue.FlowRecord, fl *envelope.Flow, starts []flow.Start) error {
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
				rec:  queue.NewJobRecord{Job: job.Record{ID: id, Name: name, Site: site, Node: s.Node, SubmittedAt: c.p.Now(), Users: rec.Users}, Envelope: task},
				done: make(chan job.Verdict, 1),
			}
			f, err := c.forwarderFor(ctx, site)
			var v job.Verdict
			if err == nil {
				v, err = f.submit(ctx, sub)
			}
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
		if err := c.advanceFlow(ctx, rec.ID, refused); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	return firstErr
}

// flowEnds advances the flows whose step jobs evs ended.
func (c *Coord) flowEnds(ctx context.Context, evs []job.Event) {
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
	refs, ok, err := c.p.Redis.FlowSteps(ctx, ids...)
	if err != nil {
		c.p.Log.Warn("look up flow steps (the sweep advances their flows)", "err", err)
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
		c.p.Log.Debug("step ends", "flow", flowID, "ends", len(ends))
		if err := c.advanceFlow(ctx, flowID, ends); err != nil {
			c.p.Log.Warn("advance flow (the sweep will)", "flow", flowID, "err", err)
		}
	}
}

// sweepFlows resumes every flow that has not ended: the ends of its
// running steps' jobs are applied (an end coord applied but did not pass
// on, a coord killed in between), steps whose jobs coord has no record of
// are submitted again, and what may start, starts.
func (c *Coord) sweepFlows(ctx context.Context) {
	ids, err := c.p.Redis.ActiveFlows(ctx, 1000)
	if err != nil {
		c.p.Log.Warn("flow sweep", "err", err)
		return
	}
	for _, id := range ids {
		rec, err := c.p.Redis.GetFlowProgress(ctx, id)
		if errors.Is(err, queue.ErrNoFlow) {
			c.p.Redis.DropActiveFlow(ctx, id)
			continue
		}
		if err != nil {
			continue
		}
		var run flow.Run
		if json.Unmarshal(rec.Run, &run) != nil || run.Done() {
			continue
		}
		fl, err := c.flowOf(ctx, id)
		if err != nil {
			continue
		}
		var ends []stepEnd
		var lost []flow.Start
		for _, st := range run.Running(fl) {
			jid := envelope.StepJobID(id, st.Step, st.Item, st.Attempt)
			j, err := c.p.Redis.GetJob(ctx, jid)
			switch {
			case errors.Is(err, queue.ErrNoJob):
				lost = append(lost, c.restart(fl, &run, st))
			case err != nil:
			case j.State.Terminal():
				ends = append(ends, stepEnd{ref: queue.StepRef{Flow: id, Step: st.Step, Item: st.Item, Attempt: st.Attempt},
					ok: j.State == job.StateSucceeded, output: j.Result, proof: proofOf(st.Attempt, j.Node, j.ResultSig), err: j.Error})
			}
		}
		if len(lost) > 0 {
			if err := c.submitSteps(ctx, rec, fl, lost); err != nil {
				c.p.Log.Warn("flow sweep: submit", "flow", id, "err", err)
			}
		}
		if err := c.advanceFlow(ctx, id, ends); err != nil {
			c.p.Log.Warn("flow sweep: advance", "flow", id, "err", err)
		}
	}
}

// restart rebuilds the start of a running item whose job coord never
// recorded: its value and inputs, as Next gave them.
func (c *Coord) restart(fl *envelope.Flow, run *flow.Run, st flow.Start) flow.Start {
	sr := run.Steps[st.Step]
	if fl.Finally != nil && st.Step == fl.Finally.Name {
		sr = run.Finally
	}
	st.Value = sr.Items[st.Item].Value
	st.Inputs, st.Proofs = run.InputsOf(fl, fl.Step(st.Step))
	return st
}

// CancelReply is what POST /v1/jobs/{id}/cancel answers: what the site's
// supervisor found (queued: removed, ended cancelled; running: told to
// stop; ended; unknown).
type CancelReply struct {
	ID     string `json:"id"`
	Result string `json:"result"`
}

// cancelJob cancels a job its caller signed (or a job of a site the caller
// administers).
func (c *Coord) cancelJob(w http.ResponseWriter, r *http.Request) {
	id := chi.URLParam(r, "id")
	p := principalOf(r.Context())
	rec, err := c.p.Redis.GetJob(r.Context(), id)
	if err == nil && !slices.Contains(rec.Users, p.user) && p.roles[rec.Site] != ledger.RoleAdmin && p.roles[ledger.AllSites] != ledger.RoleAdmin {
		err = queue.ErrNoJob
	}
	if err != nil {
		failJob(w, id, err)
		return
	}
	if rec.State.Terminal() {
		httpapi.JSON(w, http.StatusOK, CancelReply{ID: id, Result: "ended"})
		return
	}
	res, err := c.cancelAt(r.Context(), rec.Site, id, rec.Node)
	if err != nil {
		httpapi.Fail(w, httpapi.Errorf(http.StatusServiceUnavailable, "cancel: %v", err))
		return
	}
	httpapi.JSON(w, http.StatusOK, CancelReply{ID: id, Result: res})
}

// cancelAt asks site's supervisor to cancel job id (on node's queue, if it
// names one).
func (c *Coord) cancelAt(ctx context.Context, site, id, node string) (string, error) {
	base, err := c.supervisorURL(site)
	if err != nil {
		return "", err
	}
	u := base + "/v1/jobs/" + url.PathEscape(id) + "/cancel"
	if node != "" {
		u += "?node=" + url.QueryEscape(node)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.p.HTTP.Do(req)
	if err != nil {
		return "", fmt.Errorf("supervisor of site %s unreachable: %w", site, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("supervisor of site %s answered HTTP %d: %s", site, resp.StatusCode, bytes.TrimSpace(data))
	}
	var rep CancelReply
	if err := json.Unmarshal(data, &rep); err != nil {
		return "", fmt.Errorf("supervisor of site %s: bad reply: %w", site, err)
	}
	return rep.Result, nil
}

// cancelRunning cancels the jobs of a cancelled flow that still run.
func (c *Coord) cancelRunning(ctx context.Context, id string) {
	rec, err := c.p.Redis.GetFlowProgress(ctx, id)
	if err != nil {
		return
	}
	fl, err := c.flowOf(ctx, id)
	if err != nil {
		return
	}
	var run flow.Run
	if json.Unmarshal(rec.Run, &run) != nil {
		return
	}
	for _, st := range run.Running(fl) {
		s := fl.Step(st.Step)
		jid := envelope.StepJobID(id, st.Step, st.Item, st.Attempt)
		node := s.Node
		if j, err := c.p.Redis.GetJob(ctx, jid); err == nil && j.Node != "" {
			node = j.Node
		}
		if res, err := c.cancelAt(ctx, fl.SiteOf(s), jid, node); err != nil {
			c.p.Log.Warn("cancel a step of a cancelled flow", "flow", id, "job", jid, "err", err)
		} else {
			c.p.Log.Info("step of a cancelled flow", "flow", id, "job", jid, "result", res)
		}
	}
}

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

	"github.com/go-chi/chi/v5"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/flow"
	"github.com/writ-fleet/writ/internal/httpapi"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/verify"
)

// The flows API: submit, read, list and cancel flows, and cancel jobs.
// Running them is the flow engine's (flowengine.go).

// FlowReply is what POST /v1/flows and GET /v1/flows/{id} answer.
type FlowReply struct {
	ID      string                     `json:"id"`
	Name    string                     `json:"name"`
	State   string                     `json:"state"`
	Reason  job.Reason                 `json:"reason,omitempty"`
	Error   string                     `json:"error,omitempty"`
	Run     *flow.Run                  `json:"run,omitempty"`
	Outputs map[string]json.RawMessage `json:"outputs,omitempty"`
}

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
		httpapi.JSON(w, job.Status(job.Verdict{State: job.VerdictRejected, Reason: envelope.ReasonOf(err)}),
			FlowReply{ID: id, State: job.VerdictRejected, Reason: envelope.ReasonOf(err), Error: err.Error()})
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
	if err := c.flows.advance(r.Context(), id, nil); err != nil {
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
		err = c.flows.update(r.Context(), rec.ID, nil, func(fl *envelope.Flow, run *flow.Run) ([]flow.Start, bool) {
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
	fl, err := c.flows.flowOf(ctx, id)
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

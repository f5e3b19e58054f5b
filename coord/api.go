package coord

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/httpapi"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/verify"
)

// MaxWait bounds GET /v1/jobs/{id}?wait=.
const MaxWait = 5 * time.Minute

// SubmitReply is the body of POST /v1/jobs.
type SubmitReply struct {
	ID     string     `json:"id,omitempty"`
	State  string     `json:"state"`
	Reason job.Reason `json:"reason,omitempty"`
	Error  string     `json:"error,omitempty"`
}

// ListReply is the body of GET /v1/jobs.
type ListReply struct {
	Jobs []job.Record `json:"jobs"`
	// Next is the before= value of the next page; 0 when there is none.
	Next int64 `json:"next,omitempty"`
}

// Handler returns the HTTP API.
func (c *Coord) Handler() http.Handler {
	r := httpapi.NewRouter(c.p.Log)
	httpapi.Ops(r, c.p.Metrics, c.Ready)
	r.Group(func(r chi.Router) {
		// Every call is signed by a user the ledger knows; each reads
		// only the jobs it may (principal.mayRead).
		r.Use(c.auth.middleware)
		r.Post("/v1/jobs", c.postJob)
		r.Get("/v1/jobs", c.listJobs)
		r.Get("/v1/jobs/{id}", c.getJob)
		r.Get("/v1/jobs/{id}/events", c.jobEvents)
		r.Post("/v1/jobs/{id}/cancel", c.cancelJob)
		r.Post("/v1/flows", c.postFlow)
		r.Get("/v1/flows", c.listFlows)
		r.Get("/v1/flows/{id}", c.getFlow)
		r.Get("/v1/flows/{id}/events", c.flowEvents)
		r.Post("/v1/flows/{id}/cancel", c.cancelFlow)
	})
	return r
}

func (c *Coord) reply(w http.ResponseWriter, status int, rep SubmitReply) {
	c.metrics.submitted.WithLabelValues(rep.State, string(rep.Reason)).Inc()
	httpapi.JSON(w, status, rep)
}

// refuse answers with a job coord itself refused. Only a job whose
// signatures verified (users, the signers that counted) is recorded: a
// stranger's envelopes leave nothing behind, and a copy with a bad
// signature cannot make the real job look refused.
func (c *Coord) refuse(w http.ResponseWriter, r *http.Request, id string, spec *envelope.Job, users []string, err error) {
	v := job.Verdict{ID: id, State: job.VerdictRejected, Reason: envelope.ReasonOf(err), Error: err.Error()}
	if id != "" && len(users) > 0 && spec != nil {
		rec := job.Record{ID: id, State: job.StateRejected, Reason: v.Reason, Error: v.Error, SubmittedAt: c.p.Now(), Users: users}
		rec.Name, rec.Site, rec.Node = spec.Name, spec.Site, spec.Node
		if _, err := c.p.Redis.CreateJobs(r.Context(), []queue.NewJobRecord{{Job: rec}}, c.p.Retention); err != nil {
			c.p.Log.Warn("record rejected job", "job", id, "err", err)
		}
	}
	c.p.Log.Info("job rejected by coord", "job", id, "reason", v.Reason, "error", v.Error)
	c.reply(w, job.Status(v), SubmitReply{ID: id, State: v.State, Reason: v.Reason, Error: v.Error})
}

func (c *Coord) postJob(w http.ResponseWriter, r *http.Request) {
	wait, err := waitParam(r)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	body, err := httpapi.ReadBody(r, envelope.MaxEnvelopeBytes)
	if err != nil {
		var he *httpapi.Error
		if errors.As(err, &he) && he.Status == http.StatusRequestEntityTooLarge {
			c.refuse(w, r, "", nil, nil, envelope.Refuse(job.ReasonTooLarge, he.Msg))
			return
		}
		httpapi.Fail(w, err)
		return
	}
	env, err := envelope.Decode(body)
	if err != nil {
		c.refuse(w, r, "", nil, nil, err)
		return
	}
	id := env.ID()
	spec, err := env.Job()
	if err != nil {
		c.refuse(w, r, id, nil, nil, err)
		return
	}
	site, place := spec.Site, ""
	var users []string
	if spec.AnySite {
		// Choose the site here; the rest of the path treats the job as that
		// site's (its supervisor checks the site's policy again).
		if site, place, users, err = c.chooseSite(r.Context(), env, spec, id); err != nil {
			c.refuse(w, r, id, spec, nil, err)
			return
		}
	} else {
		// The verification every service runs, so a job refused here would
		// be refused by the supervisor and the runner too. A ledger coord
		// cannot reach judges nothing: the job goes on, and the supervisor
		// judges it (or it waits, pending).
		checked, err := verify.Envelope(r.Context(), c.p.Trust, env, spec, verify.Target{Site: site}, c.p.Now())
		if verify.Retry(err) {
			c.p.Log.Warn("job not verified by coord; the supervisor will", "job", id, "err", err)
		} else if err != nil {
			c.refuse(w, r, id, spec, nil, err)
			return
		} else {
			users = checked.Signers
		}
	}
	if _, ok, err := c.site(r.Context(), site); err != nil {
		httpapi.Fail(w, httpapi.Errorf(http.StatusServiceUnavailable, "ledger unreachable: %v", err))
		return
	} else if !ok {
		c.refuse(w, r, id, spec, users, envelope.Refuse(job.ReasonWrongSite, "site "+site+" is not registered in the ledger"))
		return
	}
	// Submit and wait: subscribe before the job can produce events, so
	// none is missed and a new job needs no read before it ends.
	var events <-chan job.Event
	if wait > 0 {
		release, err := c.auth.stream(principalOf(r.Context()))
		if err != nil {
			httpapi.Fail(w, err)
			return
		}
		defer release()
		ch, cancel := c.hub.subscribe(id)
		defer cancel()
		events = ch
	}
	sub := &submission{
		rec:   queue.NewJobRecord{Job: job.Record{ID: id, Name: spec.Name, Site: site, Node: spec.Node, SubmittedAt: c.p.Now(), Users: users}, Envelope: body},
		place: place,
		done:  make(chan job.Verdict, 1),
	}
	if place != "" {
		sub.rec.Job.Node = place
	}
	// Placement: a job that states what it needs and pins no node goes to
	// a node of its site with room for it. The placement is a routing
	// hint: it grants nothing, and the job's own signature still decides.
	if spec.Node == "" && !spec.AnySite && (spec.Resources != envelope.Resources{}) {
		node, err := c.placer.place(r.Context(), site, id, spec.Resources)
		if err != nil {
			c.refuse(w, r, id, spec, users, envelope.Refuse(job.ReasonNoCapacity, err.Error()))
			return
		}
		sub.place, sub.rec.Job.Node = node, node
	}
	var v job.Verdict
	f, err := c.forwarderFor(r.Context(), site)
	if err == nil {
		v, err = f.submit(r.Context(), sub)
	}
	if err != nil || v.State == job.VerdictRejected {
		c.placer.release(id)
	}
	if err != nil {
		httpapi.Fail(w, httpapi.Errorf(http.StatusServiceUnavailable, "submit: %v", err))
		return
	}
	status := http.StatusAccepted
	if v.State == job.VerdictRejected {
		status = job.Status(v)
	} else if wait > 0 {
		// Submit and wait: answer with the job's record once it ends.
		c.metrics.submitted.WithLabelValues(v.State, "").Inc()
		j, err := c.awaitJob(r.Context(), v.ID, wait, events, v.State == job.VerdictDuplicate)
		if err != nil {
			httpapi.Fail(w, err)
			return
		}
		httpapi.JSON(w, http.StatusOK, j)
		return
	}
	c.reply(w, status, SubmitReply{ID: v.ID, State: v.State, Reason: v.Reason, Error: v.Error})
}

// waitParam reads ?wait=, bounded by MaxWait.
func waitParam(r *http.Request) (time.Duration, error) {
	s := r.URL.Query().Get("wait")
	if s == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, httpapi.Errorf(http.StatusBadRequest, "wait=%q is not a duration such as 30s", s)
	}
	return min(d, MaxWait), nil
}

func (c *Coord) getJob(w http.ResponseWriter, r *http.Request) {
	id := chi.URLParam(r, "id")
	wait, err := waitParam(r)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	p := principalOf(r.Context())
	j, err := c.p.Redis.GetJob(r.Context(), id)
	if err == nil && !p.mayRead(j) {
		err = queue.ErrNoJob // another's job is as unknown as a missing one
	}
	if err == nil && wait > 0 && !j.State.Terminal() {
		release, serr := c.auth.stream(p)
		if serr != nil {
			httpapi.Fail(w, serr)
			return
		}
		defer release()
		j, err = c.waitJob(r.Context(), id, wait)
	}
	if err != nil {
		failJob(w, id, err)
		return
	}
	httpapi.JSON(w, http.StatusOK, j)
}

// waitJob returns the job once it is over or wait has passed.
func (c *Coord) waitJob(ctx context.Context, id string, wait time.Duration) (*job.Record, error) {
	var events <-chan job.Event
	if wait > 0 {
		ch, cancel := c.hub.subscribe(id)
		defer cancel()
		events = ch
	}
	return c.awaitJob(ctx, id, wait, events, true)
}

// awaitJob waits on a subscription made before the job could change. With
// readFirst false (a job just created by this request) it skips the first
// read: any event since is in the subscription.
func (c *Coord) awaitJob(ctx context.Context, id string, wait time.Duration, events <-chan job.Event, readFirst bool) (*job.Record, error) {
	if readFirst || wait == 0 {
		j, err := c.p.Redis.GetJob(ctx, id)
		if err != nil || wait == 0 || j.State.Terminal() {
			return j, err
		}
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	// A safety re-read catches events dropped for a slow subscriber.
	recheck := time.NewTicker(5 * time.Second)
	defer recheck.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-timer.C:
			return c.p.Redis.GetJob(ctx, id)
		case ev := <-events:
			if !ev.Type.Terminal() {
				continue
			}
		case <-recheck.C:
		}
		j, err := c.p.Redis.GetJob(ctx, id)
		if err != nil || j.State.Terminal() {
			return j, err
		}
	}
}

// seqAfter reports whether stream ID a comes after b.
func seqAfter(a, b string) bool {
	am, as, _ := strings.Cut(a, "-")
	bm, bs, _ := strings.Cut(b, "-")
	ami, _ := strconv.ParseUint(am, 10, 64)
	bmi, _ := strconv.ParseUint(bm, 10, 64)
	if ami != bmi {
		return ami > bmi
	}
	asi, _ := strconv.ParseUint(as, 10, 64)
	bsi, _ := strconv.ParseUint(bs, 10, 64)
	return asi > bsi
}

// jobEvents streams a job's events as server-sent events: its history,
// then live ones, ending after the event that ends the job.
func (c *Coord) jobEvents(w http.ResponseWriter, r *http.Request) {
	id := chi.URLParam(r, "id")
	ctx := r.Context()
	p := principalOf(ctx)
	release, err := c.auth.stream(p)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	defer release()
	ch, cancel := c.hub.subscribe(id)
	defer cancel()
	j, err := c.p.Redis.GetJob(ctx, id)
	if err == nil && !p.mayRead(j) {
		err = queue.ErrNoJob
	}
	if err != nil {
		failJob(w, id, err)
		return
	}
	flusher, ok := w.(http.Flusher)
	if !ok {
		httpapi.Fail(w, errors.New("streaming unsupported"))
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	last := "0-0"
	send := func(ev job.Event) bool {
		b, _ := json.Marshal(ev)
		_, err := fmt.Fprintf(w, "id: %s\nevent: %s\ndata: %s\n\n", ev.Seq, ev.Type, b)
		flusher.Flush()
		if ev.Seq != "" {
			last = ev.Seq
		}
		return err == nil
	}
	// catchUp sends recorded events not sent yet; it reports whether the
	// job has ended.
	catchUp := func() bool {
		hist, err := c.p.Redis.JobEvents(ctx, id)
		if err != nil {
			return false
		}
		ended := false
		for _, ev := range hist {
			if ev.Seq != "" && !seqAfter(ev.Seq, last) {
				continue
			}
			if !send(ev) {
				return true
			}
			// A late "queued" may follow the end in the stream; the job
			// ended all the same.
			ended = ended || ev.Type.Terminal()
			if ended {
				return true
			}
		}
		return ended
	}
	if catchUp() {
		return
	}
	if j.State.Terminal() {
		// Ended without events (refused before running): say how.
		send(job.Event{Job: id, Type: job.EventType(j.State), Reason: j.Reason, Error: j.Error, At: j.SubmittedAt})
		return
	}
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-ch:
			if ev.Seq != "" && !seqAfter(ev.Seq, last) {
				continue
			}
			if !send(ev) || ev.Type.Terminal() {
				return
			}
		case <-tick.C:
			// Heartbeat, and a re-read in case events were dropped.
			if _, err := fmt.Fprint(w, ": ping\n\n"); err != nil {
				return
			}
			flusher.Flush()
			if catchUp() {
				return
			}
			if j, err := c.p.Redis.GetJob(ctx, id); err == nil && j.State == job.StateRejected {
				send(job.Event{Job: id, Type: job.EventRejected, Reason: j.Reason, Error: j.Error, At: c.p.Now()})
				return
			}
		}
	}
}

func (c *Coord) listJobs(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := queue.ListFilter{Site: q.Get("site"), State: job.State(q.Get("state"))}
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 1000 {
			httpapi.Fail(w, httpapi.Errorf(http.StatusBadRequest, "limit must be 1-1000"))
			return
		}
		f.Limit = n
	}
	if s := q.Get("before"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			httpapi.Fail(w, httpapi.Errorf(http.StatusBadRequest, "before must be the next value of a previous page"))
			return
		}
		f.Before = n
	}
	// Only what the caller may read.
	f.Keep = principalOf(r.Context()).mayRead
	jobs, next, err := c.p.Redis.ListJobs(r.Context(), f)
	if err != nil {
		httpapi.Fail(w, err)
		return
	}
	if jobs == nil {
		jobs = []job.Record{}
	}
	httpapi.JSON(w, http.StatusOK, ListReply{Jobs: jobs, Next: next})
}

// failJob answers a failed job lookup: 404 for an unknown job.
func failJob(w http.ResponseWriter, id string, err error) {
	if errors.Is(err, queue.ErrNoJob) {
		err = &httpapi.Error{Status: http.StatusNotFound, Reason: "not_found", Msg: "no job " + id}
	}
	httpapi.Fail(w, err)
}

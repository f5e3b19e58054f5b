package coord

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/verify"
)

// forwarder sends a site's submissions to its supervisor in batches. There
// is no batching timer: each sender takes everything that queued up while
// the previous batch was in flight, so a lone job goes at once and a burst
// goes in a few large requests.
type forwarder struct {
	p       forwarderParams
	in      chan *submission
	stopped chan struct{} // closed when run has returned
}

// forwarderParams are a forwarder's dependencies.
type forwarderParams struct {
	site  string       // required
	post  postFunc     // required: sends a batch to the site's supervisor
	redis *queue.Redis // required: records every job's state
	log   *slog.Logger // required
	// retention is how long job records are kept; zero means
	// queue.DefaultJobRetention.
	retention time.Duration
}

// postFunc sends envelopes (or placed batch items) to a site's supervisor
// and returns its verdicts, one per envelope; an error means it could not
// be reached or did not answer sanely.
type postFunc func(ctx context.Context, site string, raws [][]byte) ([]job.Verdict, error)

// senders is how many batches may be in flight to one supervisor at once.
const senders = 4

// batchBytes bounds one batch's envelopes, well inside the supervisor's
// request limit (one envelope is at most envelope.MaxEnvelopeBytes).
const batchBytes = job.MaxBatchBytes / 2

// errStopping answers submissions that reach a forwarder that has stopped.
var errStopping = errors.New("coord is shutting down")

// submission is one job waiting for its supervisor's verdict.
type submission struct {
	rec   queue.NewJobRecord
	place string // the node chosen by placement, or ""
	done  chan job.Verdict
}

func newForwarder(p forwarderParams) *forwarder {
	return &forwarder{p: p, in: make(chan *submission, 4*job.MaxBatch), stopped: make(chan struct{})}
}

// run sends batches until ctx ends. Then the batches in flight finish
// (each on its own bounded context), and whatever is still waiting is
// recorded as pending, so a deliverer sends it later: nothing a handler
// handed over is lost.
func (f *forwarder) run(ctx context.Context) error {
	var g errgroup.Group
	carried := make([]*submission, senders)
	for i := range carried {
		g.Go(func() error { carried[i] = f.send(ctx); return nil })
	}
	g.Wait()
	var left []*submission
	for _, s := range carried {
		if s != nil {
			left = append(left, s)
		}
	}
	for {
		select {
		case s := <-f.in:
			left = append(left, s)
			continue
		default:
		}
		break
	}
	if len(left) > 0 {
		f.record(left, nil, errStopping)
	}
	// Closed only now, so a submission drained above has its answer by
	// the time its handler sees stopped; one that came in later is
	// answered errStopping.
	close(f.stopped)
	return nil
}

// submit hands one job to the forwarder and waits for its verdict.
func (f *forwarder) submit(ctx context.Context, s *submission) (job.Verdict, error) {
	select {
	case f.in <- s:
	case <-f.stopped:
		return job.Verdict{}, errStopping
	case <-ctx.Done():
		return job.Verdict{}, ctx.Err()
	}
	select {
	case v := <-s.done:
		return v, nil
	case <-f.stopped:
		// run recorded and answered what was left; a submission that came
		// in after that is not recorded at all.
		select {
		case v := <-s.done:
			return v, nil
		default:
			return job.Verdict{}, errStopping
		}
	case <-ctx.Done():
		return job.Verdict{}, ctx.Err()
	}
}

// send loops until ctx ends: take one submission, drain whatever else is
// waiting (up to a batch), deliver, record, answer. It returns a
// submission it took but did not send (too big for the last batch), for
// run to record.
func (f *forwarder) send(ctx context.Context) *submission {
	var carry *submission // taken from the channel but over the last batch's size
	for {
		if ctx.Err() != nil {
			return carry // stopping: run records what is still waiting
		}
		first := carry
		carry = nil
		if first == nil {
			select {
			case first = <-f.in:
			case <-ctx.Done():
				return nil
			}
		}
		batch := []*submission{first}
		size := len(first.rec.Envelope)
	drain:
		for len(batch) < job.MaxBatch {
			select {
			case s := <-f.in:
				if size+len(s.rec.Envelope)+1 > batchBytes {
					carry = s
					break drain
				}
				batch = append(batch, s)
				size += len(s.rec.Envelope) + 1
			default:
				break drain
			}
		}
		f.deliver(batch)
	}
}

// deliver sends a batch, records every job's state in one round trip, and
// answers the waiting handlers.
func (f *forwarder) deliver(batch []*submission) {
	// The handlers' contexts may end (client gone), and so may coord's
	// (shutdown): sending and recording must finish regardless, so the
	// batch runs on its own bounded context.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	raws := make([][]byte, len(batch))
	for i, s := range batch {
		raws[i] = s.rec.Envelope
		if s.place != "" {
			raws[i] = job.PlacedItem(s.place, s.rec.Envelope)
		}
	}
	verdicts, err := f.p.post(ctx, f.p.site, raws)
	f.record(batch, verdicts, err)
}

// record stores the jobs' states from the supervisor's verdicts (or, when
// postErr is set, as pending) and answers the waiting handlers.
func (f *forwarder) record(batch []*submission, verdicts []job.Verdict, postErr error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	recs := make([]queue.NewJobRecord, len(batch))
	for i, s := range batch {
		v := job.Verdict{ID: s.rec.Job.ID, Retry: true}
		if postErr == nil {
			v = verdicts[i]
		}
		s.rec.Job.State, s.rec.Job.Reason, s.rec.Job.Error = recordState(v, postErr)
		recs[i] = s.rec
	}
	if _, rerr := f.p.redis.CreateJobs(ctx, recs, f.p.retention); rerr != nil {
		f.p.log.Error("record jobs", "site", f.p.site, "err", rerr)
		for _, s := range batch {
			s.done <- job.Verdict{ID: s.rec.Job.ID, State: job.VerdictRejected, Reason: job.ReasonRedisUnavailable, Error: "coord could not record the job: " + rerr.Error(), Retry: true}
		}
		return
	}
	for i, s := range batch {
		v := job.Verdict{ID: s.rec.Job.ID, State: string(recs[i].Job.State), Reason: recs[i].Job.Reason, Error: recs[i].Job.Error}
		if postErr == nil && verdicts[i].State == job.VerdictDuplicate {
			v.State = job.VerdictDuplicate
		}
		s.done <- v
	}
}

// recordState maps a supervisor verdict (or a failure to reach it) to the
// state coord records.
func recordState(v job.Verdict, postErr error) (job.State, job.Reason, string) {
	switch {
	case postErr != nil || v.Retry:
		msg := v.Error
		if postErr != nil {
			msg = postErr.Error()
		}
		return job.StatePending, "", "waiting for the supervisor: " + msg
	case v.State == job.VerdictRejected:
		return job.StateRejected, v.Reason, v.Error
	}
	return job.StateQueued, "", ""
}

// post sends envelopes to the site's supervisor and returns its verdicts. An
// error means the supervisor could not be reached or did not answer sanely;
// the jobs are then delivered later.
func (c *Coord) post(ctx context.Context, site string, raws [][]byte) ([]job.Verdict, error) {
	base, err := c.supervisorURL(site)
	if err != nil {
		return nil, err
	}
	// Flow steps are recorded naming their flow: each request carries a
	// flow's envelope once, in its first step, and is split where the
	// envelopes would make it too large for the supervisor.
	var out []job.Verdict
	var chunk [][]byte
	size := 0
	seen := map[string]bool{}
	flush := func() error {
		if len(chunk) == 0 {
			return nil
		}
		vs, err := c.postBatch(ctx, site, base, chunk)
		out = append(out, vs...)
		chunk, size, seen = nil, 0, map[string]bool{}
		return err
	}
	for _, raw := range raws {
		item, placed, ref := raw, "", ""
		// Only a step naming its flow is decoded here: a job's envelope
		// (its payload base64) cannot hold the member name.
		if bytes.Contains(raw, []byte(`"flow_ref"`)) {
			var p job.Placed
			if json.Unmarshal(raw, &p) == nil && p.Place != "" && len(p.Envelope) > 0 {
				item, placed = p.Envelope, p.Place
			}
			ref = verify.FlowRefOf(item)
		}
		var env []byte
		if ref != "" {
			switch env, err = c.flows.flowEnvelope(ctx, ref); {
			case errors.Is(err, queue.ErrNoFlow):
				// The flow's record is gone (past its retention): the step
				// goes as it is, and its supervisor refuses it, saying so.
				ref = ""
			case err != nil:
				return nil, fmt.Errorf("flow %s of a step for site %s: %w", ref, site, err)
			}
		}
		cost := len(raw) + 1
		if ref != "" && !seen[ref] {
			cost += len(env)
		}
		if size+cost > batchBytes && len(chunk) > 0 {
			if err := flush(); err != nil {
				return nil, err
			}
		}
		if ref != "" && !seen[ref] {
			if item, err = verify.ExpandStepTask(item, env); err != nil {
				return nil, err
			}
			if raw = item; placed != "" {
				raw = job.PlacedItem(placed, item)
			}
			seen[ref] = true
		}
		chunk = append(chunk, raw)
		size += len(raw) + 1
	}
	if err := flush(); err != nil {
		return nil, err
	}
	return out, nil
}

// postBatch sends one batch request to base, the site's supervisor.
func (c *Coord) postBatch(ctx context.Context, site, base string, raws [][]byte) ([]job.Verdict, error) {
	var body bytes.Buffer
	body.WriteByte('[')
	for i, raw := range raws {
		if i > 0 {
			body.WriteByte(',')
		}
		body.Write(raw)
	}
	body.WriteByte(']')
	c.metrics.batchSize.Observe(float64(len(raws)))
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/jobs/batch", &body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.p.HTTP.Do(req)
	if err != nil {
		c.metrics.deliveries.WithLabelValues(site, "unreachable").Inc()
		return nil, fmt.Errorf("supervisor of site %s unreachable: %w", site, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		c.metrics.deliveries.WithLabelValues(site, "error").Inc()
		return nil, fmt.Errorf("supervisor of site %s: %w", site, err)
	}
	if resp.StatusCode != http.StatusOK {
		c.metrics.deliveries.WithLabelValues(site, "error").Inc()
		return nil, fmt.Errorf("supervisor of site %s answered HTTP %d: %s", site, resp.StatusCode, bytes.TrimSpace(data))
	}
	var out []job.Verdict
	if err := json.Unmarshal(data, &out); err != nil || len(out) != len(raws) {
		c.metrics.deliveries.WithLabelValues(site, "error").Inc()
		return nil, fmt.Errorf("supervisor of site %s sent a bad reply (%d verdicts for %d jobs): %v", site, len(out), len(raws), err)
	}
	c.metrics.deliveries.WithLabelValues(site, "ok").Inc()
	return out, nil
}

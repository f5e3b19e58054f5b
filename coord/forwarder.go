package coord

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/queue"
)

// forwarder sends a site's submissions to its supervisor in batches. There
// is no batching timer: each sender takes everything that queued up while
// the previous batch was in flight, so a lone job goes at once and a burst
// goes in a few large requests.
type forwarder struct {
	c    *Coord
	site string
	in   chan *submission
}

// senders is how many batches may be in flight to one supervisor at once.
const senders = 4

// batchBytes bounds one batch's envelopes, well inside the supervisor's
// request limit (one envelope is at most envelope.MaxEnvelopeBytes).
const batchBytes = job.MaxBatchBytes / 2

// submission is one job waiting for its supervisor's verdict.
type submission struct {
	rec   queue.NewJobRecord
	place string // the node chosen by placement, or ""
	done  chan job.Verdict
}

func newForwarder(c *Coord, site string) *forwarder {
	f := &forwarder{c: c, site: site, in: make(chan *submission, 4*job.MaxBatch)}
	for i := 0; i < senders; i++ {
		go f.send()
	}
	return f
}

// submit hands one job to the forwarder and waits for its verdict.
func (f *forwarder) submit(ctx context.Context, s *submission) (job.Verdict, error) {
	select {
	case f.in <- s:
	case <-ctx.Done():
		return job.Verdict{}, ctx.Err()
	}
	select {
	case v := <-s.done:
		return v, nil
	case <-ctx.Done():
		return job.Verdict{}, ctx.Err()
	}
}

// send loops forever: take one submission, drain whatever else is waiting
// (up to a batch), deliver, record, answer.
func (f *forwarder) send() {
	var carry *submission // taken from the channel but over the last batch's size
	for {
		first := carry
		carry = nil
		if first == nil {
			first = <-f.in
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
	// The handlers' contexts may end (client gone); recording must finish
	// regardless, so the batch runs on its own bounded context.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	raws := make([][]byte, len(batch))
	for i, s := range batch {
		raws[i] = s.rec.Envelope
		if s.place != "" {
			raws[i] = job.PlacedItem(s.place, s.rec.Envelope)
		}
	}
	verdicts, err := f.c.post(ctx, f.site, raws)
	recs := make([]queue.NewJobRecord, len(batch))
	for i, s := range batch {
		v := job.Verdict{ID: s.rec.Job.ID, Retry: true}
		if err == nil {
			v = verdicts[i]
		}
		s.rec.Job.State, s.rec.Job.Reason, s.rec.Job.Error = recordState(v, err)
		recs[i] = s.rec
	}
	if _, rerr := f.c.p.Redis.CreateJobs(ctx, recs, f.c.p.Retention); rerr != nil {
		f.c.p.Log.Error("record jobs", "site", f.site, "err", rerr)
		for _, s := range batch {
			s.done <- job.Verdict{ID: s.rec.Job.ID, State: job.VerdictRejected, Reason: "unavailable", Error: "coord could not record the job: " + rerr.Error(), Retry: true}
		}
		return
	}
	for i, s := range batch {
		v := job.Verdict{ID: s.rec.Job.ID, State: string(recs[i].Job.State), Reason: recs[i].Job.Reason, Error: recs[i].Job.Error}
		if err == nil && verdicts[i].State == job.VerdictDuplicate {
			v.State = job.VerdictDuplicate
		}
		s.done <- v
	}
}

// recordState maps a supervisor verdict (or a failure to reach it) to the
// state coord records.
func recordState(v job.Verdict, postErr error) (job.State, string, string) {
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

package coord

import (
	"context"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/supervisor"
)

// deliverer retries jobs whose supervisor could not be reached. Pending
// deliveries live in Redis (queue.DuePending), so a restarted coord resumes
// them. The backoff grows with the job's age: a quarter of the time since
// it was submitted, between one second and a minute.
type deliverer struct {
	c *Coord
}

const (
	deliverTick    = 500 * time.Millisecond
	minDeliverWait = time.Second
	maxDeliverWait = time.Minute
)

func (d *deliverer) run(ctx context.Context) error {
	t := time.NewTicker(deliverTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if err := d.once(ctx); err != nil && ctx.Err() == nil {
			d.c.p.Log.Warn("redeliver pending jobs", "err", err)
		}
	}
}

// once tries every due delivery, grouped by site.
func (d *deliverer) once(ctx context.Context) error {
	due, err := d.c.p.Redis.DuePending(ctx, d.c.p.Now(), supervisor.MaxBatch)
	if err != nil || len(due) == 0 {
		return err
	}
	bySite := map[string][]queue.PendingDelivery{}
	for _, p := range due {
		_, job, err := envelope.Parse(p.Envelope)
		if err != nil {
			// It parsed when accepted; a record that no longer parses is
			// dropped rather than retried forever.
			d.c.p.Redis.SetState(ctx, p.ID, queue.StateRejected, string(envelope.ReasonOf(err)), err.Error())
			d.c.p.Redis.DonePending(ctx, p.ID)
			continue
		}
		bySite[job.Site] = append(bySite[job.Site], p)
	}
	for site, ps := range bySite {
		raws := make([][]byte, len(ps))
		for i, p := range ps {
			raws[i] = p.Envelope
		}
		verdicts, err := d.c.post(ctx, site, raws)
		if err != nil {
			for _, p := range ps {
				d.reschedule(ctx, p.ID)
			}
			d.c.p.Log.Info("supervisor still unreachable; will retry", "site", site, "jobs", len(ps), "err", err)
			continue
		}
		var done []string
		for i, v := range verdicts {
			id := ps[i].ID
			switch {
			case v.Retry:
				d.reschedule(ctx, id)
				continue
			case v.State == supervisor.VerdictRejected:
				d.c.p.Redis.ResolvePending(ctx, id, queue.StateRejected, v.Reason, v.Error)
			default:
				// queued: the supervisor's event will follow; duplicate: it
				// had the job already. Either way it is queued now.
				d.c.p.Redis.ResolvePending(ctx, id, queue.StateQueued, "", "")
			}
			done = append(done, id)
		}
		if err := d.c.p.Redis.DonePending(ctx, done...); err != nil {
			return err
		}
		d.c.p.Log.Info("delivered pending jobs", "site", site, "jobs", len(done))
	}
	return nil
}

func (d *deliverer) reschedule(ctx context.Context, id string) {
	wait := minDeliverWait
	if j, err := d.c.p.Redis.GetJob(ctx, id); err == nil {
		wait = max(minDeliverWait, min(maxDeliverWait, d.c.p.Now().Sub(j.SubmittedAt)/4))
	}
	d.c.p.Redis.RetryPendingAt(ctx, id, d.c.p.Now().Add(wait))
}

package coord

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/verify"
)

// deliverer retries jobs whose supervisor could not be reached. Pending
// deliveries live in Redis (queue.DuePending), so a restarted coord resumes
// them. The backoff grows with the job's age: a quarter of the time since
// it was submitted, between one second and a minute.
type deliverer struct {
	p delivererParams
}

// delivererParams are a deliverer's dependencies.
type delivererParams struct {
	redis *queue.Redis     // required: pending deliveries and job records
	post  postFunc         // required
	now   func() time.Time // required
	log   *slog.Logger     // required
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
			d.p.log.Warn("redeliver pending jobs", "err", err)
		}
	}
}

// once tries every due delivery, grouped by site. Each job goes to the
// site coord recorded for it, placed on the node recorded for it (a job for
// any site or with resources keeps the choice made at submission). It
// returns every error it met; a delivery that met one is tried again later.
func (d *deliverer) once(ctx context.Context) error {
	due, err := d.p.redis.DuePending(ctx, d.p.now(), job.MaxBatch)
	if err != nil || len(due) == 0 {
		return err
	}
	type delivery struct {
		id  string
		raw []byte // the envelope, or its placed batch item
	}
	var errs []error
	drop := func(id string, state job.State, reason job.Reason, msg string) {
		if err := d.p.redis.ResolvePending(ctx, id, state, reason, msg); err != nil {
			errs = append(errs, fmt.Errorf("resolve pending job %s: %w", id, err))
			return
		}
		if err := d.p.redis.DonePending(ctx, id); err != nil {
			errs = append(errs, fmt.Errorf("drop pending job %s: %w", id, err))
		}
	}
	bySite := map[string][]delivery{}
	for _, p := range due {
		var spec *envelope.Job
		_, isStep, err := verify.ParseStepTask(p.Envelope)
		if isStep {
			// A step of a flow: the supervisor checks it (verify.StepJob);
			// it carries no placement.
			spec = &envelope.Job{}
		} else {
			var env *envelope.Envelope
			if env, err = envelope.Decode(p.Envelope); err == nil {
				spec, err = env.Job()
			}
		}
		if err != nil {
			// It decoded when accepted; a record that no longer does is
			// dropped rather than retried forever.
			drop(p.ID, job.StateRejected, envelope.ReasonOf(err), err.Error())
			continue
		}
		rec, err := d.p.redis.GetJob(ctx, p.ID)
		if errors.Is(err, queue.ErrNoJob) {
			// Its record expired: nobody can follow it any more.
			if err := d.p.redis.DonePending(ctx, p.ID); err != nil {
				errs = append(errs, fmt.Errorf("drop pending job %s: %w", p.ID, err))
			}
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("read pending job %s: %w", p.ID, err))
			continue
		}
		raw := p.Envelope
		if spec.Node == "" && rec.Node != "" {
			raw = job.PlacedItem(rec.Node, p.Envelope)
		}
		bySite[rec.Site] = append(bySite[rec.Site], delivery{id: p.ID, raw: raw})
	}
	for site, ds := range bySite {
		raws := make([][]byte, len(ds))
		for i, dl := range ds {
			raws[i] = dl.raw
		}
		verdicts, err := d.p.post(ctx, site, raws)
		if err != nil {
			for _, dl := range ds {
				if err := d.reschedule(ctx, dl.id); err != nil {
					errs = append(errs, err)
				}
			}
			d.p.log.Info("supervisor still unreachable; will retry", "site", site, "jobs", len(ds), "err", err)
			continue
		}
		var done []string
		for i, v := range verdicts {
			id := ds[i].id
			var err error
			switch {
			case v.Retry:
				if err := d.reschedule(ctx, id); err != nil {
					errs = append(errs, err)
				}
				continue
			case v.State == job.VerdictRejected:
				err = d.p.redis.ResolvePending(ctx, id, job.StateRejected, v.Reason, v.Error)
			default:
				// queued: the supervisor's event will follow; duplicate: it
				// had the job already. Either way it is queued now.
				err = d.p.redis.ResolvePending(ctx, id, job.StateQueued, "", "")
			}
			if err != nil {
				// Left pending: the next round delivers it again, which
				// the supervisor answers as a duplicate.
				errs = append(errs, fmt.Errorf("resolve pending job %s: %w", id, err))
				continue
			}
			done = append(done, id)
		}
		if err := d.p.redis.DonePending(ctx, done...); err != nil {
			errs = append(errs, fmt.Errorf("drop delivered jobs: %w", err))
			continue
		}
		d.p.log.Info("delivered pending jobs", "site", site, "jobs", len(done))
	}
	return errors.Join(errs...)
}

// reschedule puts a pending delivery back, due after its backoff.
func (d *deliverer) reschedule(ctx context.Context, id string) error {
	wait := minDeliverWait
	if j, err := d.p.redis.GetJob(ctx, id); err == nil {
		wait = max(minDeliverWait, min(maxDeliverWait, d.p.now().Sub(j.SubmittedAt)/4))
	}
	if err := d.p.redis.RetryPendingAt(ctx, id, d.p.now().Add(wait)); err != nil {
		return fmt.Errorf("reschedule pending job %s: %w", id, err)
	}
	return nil
}

package runner

import (
	"context"
	"time"

	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/queue"
)

// reaper reports jobs whose runner stopped mid-run when they had no retries
// left: asynq archives such a task when its lease expires without calling
// any handler, so without the reaper the job would stay "running" forever.
type reaper struct {
	r        *Runner
	rdb      *queue.Redis
	interval time.Duration
}

// reapInterval is how often the reaper looks; asynq itself only notices a
// lost task a minute after its runner stopped.
const reapInterval = 30 * time.Second

func (rp *reaper) run(ctx context.Context) error {
	t := time.NewTicker(rp.interval)
	defer t.Stop()
	for {
		rp.once(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func (rp *reaper) once(ctx context.Context) {
	r := rp.r
	lost, err := rp.rdb.ClaimLost(queue.SiteQueue(r.p.Site), queue.NodeQueue(r.p.Node))
	if err != nil {
		r.p.Log.Warn("look for lost jobs", "err", err)
	}
	for _, t := range lost {
		ev := job.Event{Job: t.ID, Type: job.EventFailed, At: r.p.Now(), Site: r.p.Site, Attempt: t.Attempts,
			Reason: job.ReasonRunnerLost, Error: "the runner running this job stopped mid-run and no retries were left"}
		if err := rp.rdb.Publish(ctx, r.p.Site, ev); err != nil {
			r.p.Log.Error("report lost job", "job", t.ID, "err", err)
			continue
		}
		r.jobs.WithLabelValues(r.p.Site, "failed", string(job.ReasonRunnerLost)).Inc()
		r.p.Log.Warn("job lost with its runner; reported failed", "job", t.ID, "queue", t.Queue)
	}
}

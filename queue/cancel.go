package queue

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hibiken/asynq"

	"github.com/writ-fleet/writ/job"
)

func cancelKey(site, id string) string { return "writ:site:" + site + ":cancel:" + id }

// Cancellation is what CancelJob found and did.
type Cancellation string

const (
	CancelQueued  Cancellation = "queued"  // it had not started: removed, and ended cancelled
	CancelRunning Cancellation = "running" // its run was told to stop; its runner ends it cancelled
	CancelEnded   Cancellation = "ended"   // it had ended already; nothing changed
	CancelUnknown Cancellation = "unknown" // no task of it is on the queue
)

// CancelJob cancels job id of site, whose task is on one of queues. It marks the
// job cancelled first (for EndRetention), so a runner whose run stops
// reports it cancelled rather than retrying it, and a copy that reaches a
// runner later is not run. A task not yet started is deleted and the job
// ended cancelled here; a running one is stopped through asynq's cancel
// (its context ends within moments, on whichever worker runs it).
func (r *Redis) CancelJob(ctx context.Context, site, id string, queues ...string) (Cancellation, error) {
	ended, err := r.Ended(ctx, site, id)
	if err != nil {
		return "", err
	}
	if ended[0] {
		return CancelEnded, nil
	}
	if err := r.rdb.Set(ctx, cancelKey(site, id), "1", EndRetention).Err(); err != nil {
		return "", fmt.Errorf("queue: cancel job %s: %w", id, err)
	}
	insp := asynq.NewInspectorFromRedisClient(r.rdb)
	var info *asynq.TaskInfo
	var q string
	for _, q = range queues {
		var err error
		info, err = insp.GetTaskInfo(q, id)
		if errors.Is(err, asynq.ErrTaskNotFound) || errors.Is(err, asynq.ErrQueueNotFound) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("queue: cancel job %s: %w", id, err)
		}
		break
	}
	if info == nil {
		return CancelUnknown, nil
	}
	if info.State == asynq.TaskStateActive {
		if err := insp.CancelProcessing(id); err != nil {
			return "", fmt.Errorf("queue: cancel job %s: %w", id, err)
		}
		return CancelRunning, nil
	}
	if err := insp.DeleteTask(q, id); err != nil {
		if errors.Is(err, asynq.ErrTaskNotFound) {
			return CancelUnknown, nil
		}
		// It started meanwhile: stop the run instead.
		if err := insp.CancelProcessing(id); err != nil {
			return "", fmt.Errorf("queue: cancel job %s: %w", id, err)
		}
		return CancelRunning, nil
	}
	ev := job.Event{Job: id, Type: job.EventFailed, Reason: job.ReasonCancelled, Error: "cancelled before it started", At: time.Now()}
	if err := r.Publish(ctx, site, ev); err != nil {
		return "", err
	}
	return CancelQueued, nil
}

// CancelRequested reports whether job id of site was cancelled.
func (r *Redis) CancelRequested(ctx context.Context, site, id string) (bool, error) {
	n, err := r.rdb.Exists(ctx, cancelKey(site, id)).Result()
	return n == 1, err
}

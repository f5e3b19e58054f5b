package queue

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/writ-fleet/writ/job"
)

// Admission is what the replay guard knows about a job's nonce.
type Admission int

// Admission results.
const (
	// AdmitNew: the nonce was unused and is now claimed for this job.
	AdmitNew Admission = iota
	// AdmitInFlight: this same job claimed the nonce before but was not
	// recorded as enqueued (a crash or a concurrent duplicate); enqueue it
	// again, which asynq makes idempotent by task ID while the task exists,
	// and EnqueueUnlessEnded once it is gone.
	AdmitInFlight
	// AdmitDuplicate: this same job is already enqueued; do nothing.
	AdmitDuplicate
	// AdmitReplay: another job already used the nonce; refuse.
	AdmitReplay
	// AdmitEnded: this same job ran and ended (see Ended); do nothing.
	AdmitEnded
)

func (a Admission) String() string {
	return [...]string{"new", "in-flight", "duplicate", "replay", "ended"}[a]
}

// Claim is one nonce to claim for a job.
type Claim struct {
	Site, Nonce, JobID string
	// Until is when the job expires; the claim is kept that long (plus a
	// margin for clock skew), after which the job is refused as expired.
	Until time.Time
}

const queuedMark = "|queued"

func nonceKey(site, nonce string) string { return "writ:site:" + site + ":nonce:" + nonce }

// Admit claims the nonces of a batch of jobs in one round trip. It uses
// SET NX GET, so of two racing claims exactly one wins.
func (r *Redis) Admit(ctx context.Context, claims []Claim) ([]Admission, error) {
	pipe := r.rdb.Pipeline()
	cmds := make([]*redis.StatusCmd, len(claims))
	ends := make([]*redis.IntCmd, len(claims))
	now := time.Now()
	for i, c := range claims {
		ttl := c.Until.Sub(now) + 10*time.Minute
		cmds[i] = pipe.SetArgs(ctx, nonceKey(c.Site, c.Nonce), c.JobID, redis.SetArgs{Mode: "NX", Get: true, TTL: ttl})
		ends[i] = pipe.Exists(ctx, endKey(c.Site, c.JobID))
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("claim nonces: %w", err)
	}
	out := make([]Admission, len(claims))
	for i, cmd := range cmds {
		prev, err := cmd.Result()
		switch {
		case errors.Is(err, redis.Nil):
			out[i] = AdmitNew
		case err != nil:
			return nil, fmt.Errorf("claim nonce: %w", err)
		case prev == claims[i].JobID+queuedMark:
			out[i] = AdmitDuplicate
		case prev == claims[i].JobID && ends[i].Val() > 0:
			out[i] = AdmitEnded
		case prev == claims[i].JobID:
			out[i] = AdmitInFlight
		default:
			out[i] = AdmitReplay
		}
	}
	return out, nil
}

// Queued marks claims as enqueued and publishes their events, in one round
// trip.
func (r *Redis) Queued(ctx context.Context, site string, claims []Claim, events []job.Event) error {
	pipe := r.rdb.Pipeline()
	for _, c := range claims {
		pipe.SetArgs(ctx, nonceKey(c.Site, c.Nonce), c.JobID+queuedMark, redis.SetArgs{KeepTTL: true})
	}
	publishPipe(ctx, pipe, site, events)
	wait := r.waitReplicas(ctx, pipe)
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("record queued jobs: %w", err)
	}
	return r.replicated(wait)
}

// Package queue is writ's only Redis and asynq code: the job task
// (TaskType) and its queues (SiteQueue, NodeQueue), the enqueuing client
// supervisors use, the worker server runners use, each site's event stream,
// the replay guard, and the job records coord keeps.
//
// Redis is not a trust boundary: a task carries the signed envelope bytes,
// and the runner verifies them again before running anything.
package queue

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
)

// TaskType is the asynq task type of a writ job.
const TaskType = "writ:job"

// SiteQueue returns the queue every runner of site listens on.
func SiteQueue(site string) string { return "site:" + site }

// NodeQueue returns the queue only node's runner listens on.
func NodeQueue(node string) string { return "node:" + node }

// Redis is a connection to one Redis deployment.
type Redis struct {
	rdb redis.UniversalClient
	url string

	once   sync.Once
	client *asynq.Client // made on first use by asynqClient
}

// Connect parses a redis:// URL (redis://[:password@]host:port[/db]) and
// connects. It does not wait for the server; see Ping.
func Connect(url string) (*Redis, error) {
	opt, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("redis url %q: %w", url, err)
	}
	// Pool big enough for the workers and concurrent enqueues of a runner
	// or supervisor on a small machine; go-redis's default is 10 per CPU.
	if opt.PoolSize < 64 {
		opt.PoolSize = 64
	}
	// RESP2: writ uses no RESP3 feature, and go-redis peeks for RESP3 push
	// notifications on every reply, which cost 7% of the fleet's CPU in
	// the end-to-end benchmark.
	if opt.Protocol == 0 {
		opt.Protocol = 2
	}
	return &Redis{rdb: redis.NewClient(opt), url: url}, nil
}

// Ping checks Redis answers.
func (r *Redis) Ping(ctx context.Context) error {
	if err := r.rdb.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("redis %s: %w", redact(r.url), err)
	}
	return nil
}

// WaitReady pings until Redis answers or ctx ends.
func (r *Redis) WaitReady(ctx context.Context) error {
	for {
		err := r.Ping(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Close closes the connection pool.
func (r *Redis) Close() error { return r.rdb.Close() }

// URL returns the URL this connection was made from, password redacted.
func (r *Redis) URL() string { return redact(r.url) }

// Redact returns a Redis URL with its password replaced by ***.
func Redact(url string) string { return redact(url) }

func redact(url string) string {
	if i := strings.Index(url, "@"); i > 0 {
		if j := strings.Index(url, "://"); j > 0 && j < i {
			return url[:j+3] + "***" + url[i:]
		}
	}
	return url
}

// QueueDepth returns the pending task count of each named queue (0 for a
// queue that does not exist yet).
func (r *Redis) QueueDepth(queues ...string) (map[string]int, error) {
	insp := asynq.NewInspectorFromRedisClient(r.rdb)
	out := make(map[string]int, len(queues))
	for _, q := range queues {
		info, err := insp.GetQueueInfo(q)
		if err != nil {
			if strings.Contains(err.Error(), "not found") {
				out[q] = 0
				continue
			}
			return nil, err
		}
		out[q] = info.Pending + info.Retry + info.Scheduled
	}
	return out, nil
}

package queue

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"github.com/writ-fleet/writ/job"
)

// Task is one job to enqueue.
type Task struct {
	// ID is the job ID; asynq refuses a second task with the same ID, so a
	// duplicate submission is a no-op.
	ID string
	// Envelope is the signed envelope, as submitted.
	Envelope []byte
	// Queue is SiteQueue(site) or NodeQueue(node).
	Queue string
	// MaxRetry is how often a failed run is retried.
	MaxRetry int
	// Timeout bounds one run (asynq cancels the handler's context).
	Timeout time.Duration
	// ProcessAt holds the task until then (a flow step's not_before):
	// asynq schedules it, no one polls. Zero: at once.
	ProcessAt time.Time

	delay time.Duration // see EnqueueUnlessEnded
}

// Enqueue adds t to its queue. It reports dup when a task with the same ID
// still exists (queued, running or retrying), in which case nothing changed.
// A completed task is gone, so it does not count: the supervisor's replay
// guard (Admit) is what keeps a finished job from running twice.
func (r *Redis) Enqueue(ctx context.Context, t Task) (dup bool, err error) {
	c := r.asynqClient()
	if d := time.Until(t.ProcessAt); d > t.delay {
		t.delay = d
	}
	task := asynq.NewTask(TaskType, t.Envelope,
		asynq.TaskID(t.ID),
		asynq.Queue(t.Queue),
		asynq.MaxRetry(t.MaxRetry),
		// The runner applies the job's own timeout; asynq's is a backstop
		// a little longer so the runner's classification wins.
		asynq.Timeout(t.Timeout+10*time.Second),
		asynq.ProcessIn(t.delay),
		// No asynq deadline: asynq would drop a task past it without
		// calling the handler, so nobody would report the job. The runner
		// checks the job's expiry itself and reports it as expired.
	)
	if _, err := c.EnqueueContext(ctx, task); err != nil {
		if errors.Is(err, asynq.ErrTaskIDConflict) {
			return true, nil
		}
		return false, fmt.Errorf("enqueue job %s: %w", t.ID, err)
	}
	return false, nil
}

// readmitDelay holds a re-admitted job's new task back long enough for
// EnqueueUnlessEnded to take it out again.
const readmitDelay = 2 * time.Second

// EnqueueUnlessEnded enqueues a job again whose admission did not finish
// (AdmitInFlight: a supervisor died between enqueueing it and recording
// that). The first task may since have run, ended and been deleted by
// asynq, which would then take a second task with the same ID. So the new
// task is scheduled readmitDelay ahead, and if the job's end is recorded
// once it is in (the end is published before asynq deletes a task, so a
// deleted first task has left its end behind), it is deleted again before
// any worker sees it. ended reports that case.
func (r *Redis) EnqueueUnlessEnded(ctx context.Context, site string, t Task) (dup, ended bool, err error) {
	t.delay = readmitDelay
	dup, err = r.Enqueue(ctx, t)
	if err != nil || dup {
		return dup, false, err
	}
	e, err := r.Ended(ctx, site, t.ID)
	if err != nil {
		return false, false, err
	}
	if !e[0] {
		return false, false, nil
	}
	if err := asynq.NewInspectorFromRedisClient(r.rdb).DeleteTask(t.Queue, t.ID); err != nil && !errors.Is(err, asynq.ErrTaskNotFound) {
		return false, true, fmt.Errorf("job %s ended; its second task %s stays scheduled: %w", t.ID, t.ID, err)
	}
	return false, true, nil
}

func (r *Redis) asynqClient() *asynq.Client {
	r.once.Do(func() { r.client = asynq.NewClientFromRedisClient(r.rdb) })
	return r.client
}

// Delivery is one run of a job handed to a worker.
type Delivery struct {
	ID       string
	Envelope []byte
	Queue    string
	// Attempt is 1 for the first run, 2 for the first retry, ...
	Attempt int
	// MaxRetry is the task's retry limit.
	MaxRetry int
}

// LastAttempt reports whether a failure of this run is final.
func (d Delivery) LastAttempt() bool { return d.Attempt > d.MaxRetry }

// Outcome tells the worker server what to do with a failed run.
type Outcome int

// The outcomes of a failed run.
const (
	// Retry runs the job again after a backoff, up to its retry limit.
	Retry Outcome = iota
	// Fail ends the job as failed without retrying.
	Fail
)

func (o Outcome) String() string {
	if o == Fail {
		return "fail"
	}
	return "retry"
}

// NoRetry wraps err so the worker server fails the job without retrying.
func NoRetry(err error) error { return fmt.Errorf("%w: %w", err, asynq.SkipRetry) }

// IsNoRetry reports whether err was made by NoRetry.
func IsNoRetry(err error) bool { return errors.Is(err, asynq.SkipRetry) }

// Handler runs one delivery. A nil error completes the job; an error wrapped
// by NoRetry fails it; any other error retries it.
type Handler func(ctx context.Context, d Delivery) error

// WorkerConfig configures a worker server.
type WorkerConfig struct {
	// Site is the site whose jobs these are. A job asynq hands over again
	// (a retry, or a task recovered from a lapsed lease) whose end the site
	// has already published (see Ended) is acknowledged without calling the
	// handler: a runner killed between its success event and asynq's
	// acknowledgement, or whose acknowledgement never reached Redis, does
	// not cause a second run. Required.
	Site string
	// Queues to take jobs from, with priorities (higher runs more often).
	Queues map[string]int
	// Concurrency is the number of jobs run at once. Required.
	Concurrency int
	// PollInterval is how long an idle worker waits before asking Redis
	// again. Zero means DefaultPollInterval. asynq's own default (1 s)
	// puts about half a second of idle latency on every job.
	PollInterval time.Duration
	// ShutdownTimeout is how long running jobs get to finish on shutdown
	// before they are requeued. Zero means DefaultShutdownTimeout.
	ShutdownTimeout time.Duration
	// Dequeuers is how many asynq servers share Concurrency. Each asynq
	// server takes tasks from Redis in one serial loop (one round trip per
	// queue tried), which caps a busy runner's intake; several loops lift
	// the cap. Zero means DefaultDequeuers.
	Dequeuers int
	// Log receives asynq's own messages at warn and above.
	Log *slog.Logger
}

// RescueInterval is how often a worker looks for active tasks that lost
// their lease.
var RescueInterval = 30 * time.Second

// Defaults for WorkerConfig.
const (
	DefaultPollInterval    = 10 * time.Millisecond
	DefaultShutdownTimeout = 10 * time.Second
	DefaultDequeuers       = 4
)

// RetryDelay is the backoff after a run that had been retried n times
// before (asynq's count, from 0): 1 s, 2 s, 4 s, ... capped at one minute.
func RetryDelay(n int) time.Duration {
	d := time.Second << min(max(n, 0), 6)
	return min(d, time.Minute)
}

// Work runs h for deliveries from cfg.Queues until ctx ends, then shuts
// down: it stops taking jobs, waits up to ShutdownTimeout for running ones,
// and leaves any still running to be requeued by asynq's lease recovery.
func (r *Redis) Work(ctx context.Context, cfg WorkerConfig, h Handler) error {
	if cfg.Concurrency <= 0 {
		return errors.New("worker: Concurrency must be positive")
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.ShutdownTimeout == 0 {
		cfg.ShutdownTimeout = DefaultShutdownTimeout
	}
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	if cfg.Dequeuers == 0 {
		cfg.Dequeuers = DefaultDequeuers
	}
	cfg.Dequeuers = min(cfg.Dequeuers, cfg.Concurrency)
	if cfg.Site == "" {
		return errors.New("worker: Site is required")
	}
	flows := &flowCache{}
	handler := asynq.HandlerFunc(func(ctx context.Context, t *asynq.Task) error {
		id, _ := asynq.GetTaskID(ctx)
		q, _ := asynq.GetQueueName(ctx)
		retried, _ := asynq.GetRetryCount(ctx)
		maxRetry, _ := asynq.GetMaxRetry(ctx)
		if retried > 0 {
			// Only a task handed over again can belong to a job that
			// ended: asynq deletes a task once acknowledged, and the
			// supervisor admits no second task of an ended job. This is
			// also what writ relies on when an acknowledgement is lost:
			// asynq v0.26.0's processor.markAsDone retries a failed one
			// with the context its own defer has already cancelled, so the
			// retry never succeeds and the task waits, active, for its
			// lease to lapse (see asynq#642 for a neighbour of this bug;
			// TestOnce_RedisDownAtAck holds writ to it).
			ended, err := r.Ended(ctx, cfg.Site, id)
			if err != nil {
				return err // asynq retries; nothing ran
			}
			if ended[0] {
				log.Info("job already ended: acknowledged without running it again", "job", id, "attempt", retried+1)
				return nil
			}
			// A cancelled run comes back at once: asynq's processor
			// retries a task whose context was cancelled without waiting
			// for its handler (asynq v0.26.0 processor.exec), so this copy
			// can arrive before the cancelled run has reported its end. It
			// is ended cancelled here (a no-op if that run's end came
			// first) and not run.
			cancelled, err := r.CancelRequested(ctx, cfg.Site, id)
			if err != nil {
				return err
			}
			if cancelled {
				ev := job.Event{Job: id, Type: job.EventFailed, Reason: job.ReasonCancelled, Error: "cancelled", At: time.Now(), Attempt: retried + 1}
				if err := r.Publish(ctx, cfg.Site, ev); err != nil {
					return err
				}
				log.Info("job cancelled: acknowledged without running it again", "job", id, "attempt", retried+1)
				return nil
			}
		}
		payload, err := r.expandFlow(ctx, flows, cfg.Site, t.Payload())
		if err != nil {
			return err // asynq retries; nothing ran
		}
		return h(ctx, Delivery{ID: id, Envelope: payload, Queue: q, Attempt: retried + 1, MaxRetry: maxRetry})
	})
	var servers []*asynq.Server
	for i := 0; i < cfg.Dequeuers; i++ {
		// Spread Concurrency over the servers: 10 over 4 is 3+3+2+2.
		n := cfg.Concurrency / cfg.Dequeuers
		if i < cfg.Concurrency%cfg.Dequeuers {
			n++
		}
		srv := asynq.NewServerFromRedisClient(r.rdb, asynq.Config{
			Concurrency:       n,
			Queues:            cfg.Queues,
			TaskCheckInterval: cfg.PollInterval,
			// Retries are due when their backoff ends; check for them
			// often enough that a 1 s backoff is not a 5 s one.
			DelayedTaskCheckInterval: 500 * time.Millisecond,
			RetryDelayFunc: func(n int, _ error, _ *asynq.Task) time.Duration {
				return RetryDelay(n)
			},
			ShutdownTimeout: cfg.ShutdownTimeout,
			Logger:          asynqLogger{log},
			LogLevel:        asynq.WarnLevel,
		})
		if err := srv.Start(handler); err != nil {
			for _, s := range servers {
				s.Shutdown()
			}
			return fmt.Errorf("worker: %w", err)
		}
		servers = append(servers, srv)
	}
	go func() {
		// Tasks stranded by a lost lease (see rescueStranded) are found
		// within this interval and retried by asynq's recoverer.
		t := time.NewTicker(RescueInterval)
		defer t.Stop()
		queues := make([]string, 0, len(cfg.Queues))
		for q := range cfg.Queues {
			queues = append(queues, q)
		}
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if n, err := r.RescueStranded(ctx, queues...); err != nil && ctx.Err() == nil {
					log.Warn("look for stranded tasks", "err", err)
				} else if n > 0 {
					log.Warn("tasks without a lease (lost in a failover?) handed to asynq's recoverer", "tasks", n)
				}
			}
		}
	}()
	<-ctx.Done()
	// Order: stop every server taking new jobs first, then wait for the
	// running ones (each server waits up to ShutdownTimeout, in parallel).
	for _, s := range servers {
		s.Stop()
	}
	var wg sync.WaitGroup
	for _, s := range servers {
		wg.Add(1)
		go func() { defer wg.Done(); s.Shutdown() }()
	}
	wg.Wait()
	return nil
}

type asynqLogger struct{ log *slog.Logger }

func (l asynqLogger) Debug(args ...any) { l.log.Debug(fmt.Sprint(args...), "from", "asynq") }
func (l asynqLogger) Info(args ...any)  { l.log.Info(fmt.Sprint(args...), "from", "asynq") }
func (l asynqLogger) Warn(args ...any)  { l.log.Warn(fmt.Sprint(args...), "from", "asynq") }
func (l asynqLogger) Error(args ...any) { l.log.Error(fmt.Sprint(args...), "from", "asynq") }
func (l asynqLogger) Fatal(args ...any) { l.log.Error(fmt.Sprint(args...), "from", "asynq") }

// LostTask is a task asynq gave up on by itself: its runner stopped
// mid-run (lease expired) and it had no retries left. No handler ran to
// report it, so its job needs a failed event.
type LostTask struct {
	ID       string
	Queue    string
	Envelope []byte
	Attempts int
}

// ClaimLost returns the lost tasks of queues and deletes them from asynq's
// archive. Deletion is the claim: of several runners calling at once, each
// lost task goes to exactly one.
func (r *Redis) ClaimLost(queues ...string) ([]LostTask, error) {
	insp := asynq.NewInspectorFromRedisClient(r.rdb)
	var out []LostTask
	for _, q := range queues {
		tasks, err := insp.ListArchivedTasks(q, asynq.PageSize(100))
		if err != nil {
			if strings.Contains(err.Error(), "not found") {
				continue
			}
			return out, fmt.Errorf("list archived tasks of %s: %w", q, err)
		}
		for _, t := range tasks {
			if t.LastErr != asynq.ErrLeaseExpired.Error() {
				continue // a handler failed it and reported it
			}
			if err := insp.DeleteTask(q, t.ID); err != nil {
				continue // another runner claimed it
			}
			out = append(out, LostTask{ID: t.ID, Queue: q, Envelope: t.Payload, Attempts: t.Retried + 1})
		}
	}
	return out, nil
}

// rescueStranded gives every active task of q that has no lease a lapsed
// one, so asynq's recoverer retries it. asynq moves a task to active and
// gives it a lease in one script, and removes both in one, so an active
// task without a lease is one whose lease was lost: a Redis failover to a
// replica that had the task's move but not its lease, or a lease entry
// dropped otherwise. asynq itself lists only lapsed leases, so such a task
// would stay active forever (reported upstream: hibiken/asynq issues on
// tasks stuck active after failovers). It returns how many it rescued.
var rescueStranded = redis.NewScript(`
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local n = 0
for _, id in ipairs(ids) do
  if not redis.call('ZSCORE', KEYS[2], id) then
    redis.call('ZADD', KEYS[2], ARGV[1], id)
    n = n + 1
  end
end
return n
`)

// RescueStranded runs rescueStranded on each queue.
func (r *Redis) RescueStranded(ctx context.Context, queues ...string) (int, error) {
	lapsed := time.Now().Add(-2 * time.Minute).Unix()
	total := 0
	for _, q := range queues {
		n, err := rescueStranded.Run(ctx, r.rdb, []string{"asynq:{" + q + "}:active", "asynq:{" + q + "}:lease"}, lapsed).Int()
		if err != nil {
			return total, fmt.Errorf("rescue stranded tasks of %s: %w", q, err)
		}
		total += n
	}
	return total, nil
}

package queue

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/writ-fleet/writ/internal/redisproc"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
)

// The tests here hold writ to "a job completes once" on the three paths
// that made a job succeed twice (issue 15): a runner killed between its
// success event and asynq's acknowledgement; a supervisor killed between
// enqueueing a job and recording that; Redis down at the acknowledgement.

const onceSite = "once"

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// onceWorker runs in a child process (see TestMain-less helper below): it
// takes one task, publishes its success, and kills itself with SIGKILL
// before returning, so asynq never acknowledges the task.
func TestOnce_HelperKilledAfterSuccess(t *testing.T) {
	url := os.Getenv("WRIT_ONCE_WORKER")
	if url == "" {
		t.Skip("helper process for TestOnce_RunnerKilledBeforeAck")
	}
	r, err := Connect(url)
	if err != nil {
		os.Exit(2)
	}
	r.Work(context.Background(), WorkerConfig{Site: onceSite, Queues: map[string]int{SiteQueue(onceSite): 1}, Concurrency: 1, Log: quiet},
		func(ctx context.Context, d Delivery) error {
			if err := r.Publish(ctx, onceSite, job.Event{Job: d.ID, Type: job.EventSucceeded, Attempt: d.Attempt, At: time.Now()}); err != nil {
				os.Exit(3)
			}
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {}
		})
	os.Exit(4)
}

// succeededEvents counts the succeeded events of id in the site's stream.
func succeededEvents(t *testing.T, r *Redis, id string) int {
	t.Helper()
	evs, err := r.ReadEvents(context.Background(), onceSite, "0", 10000, -1)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, ev := range evs {
		if ev.Job == id && ev.Type == job.EventSucceeded {
			n++
		}
	}
	return n
}

// lapseLease makes asynq's lease on an active task lapse now (as it does
// 30 s after its worker died), so a recoverer finds it at once.
func lapseLease(t *testing.T, r *Redis, q, id string) {
	t.Helper()
	if err := r.rdb.ZAdd(context.Background(), "asynq:{"+q+"}:lease", redis.Z{Score: float64(time.Now().Add(-2 * time.Minute).Unix()), Member: id}).Err(); err != nil {
		t.Fatal(err)
	}
}

// taskGone waits until asynq holds no task id (acknowledged and deleted).
func taskGone(t *testing.T, r *Redis, q, id string) {
	t.Helper()
	insp := asynq.NewInspectorFromRedisClient(r.rdb)
	testenv.WaitFor(t, 30*time.Second, "task "+id+" acknowledged", func() bool {
		_, err := insp.GetTaskInfo(q, id)
		return err != nil
	})
}

// workCounting runs a worker whose handler counts its calls and succeeds.
func workCounting(t *testing.T, r *Redis, calls *atomic.Int32) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.Work(ctx, WorkerConfig{Site: onceSite, Queues: map[string]int{SiteQueue(onceSite): 1}, Concurrency: 2, Log: quiet},
			func(ctx context.Context, d Delivery) error {
				calls.Add(1)
				return r.Publish(ctx, onceSite, job.Event{Job: d.ID, Type: job.EventSucceeded, Attempt: d.Attempt, At: time.Now()})
			})
	}()
	t.Cleanup(func() { cancel(); <-done })
}

// TestOnce_RunnerKilledBeforeAck: a worker process publishes a job's
// success and is killed -9 before asynq acknowledges it. When asynq
// recovers the task, the next worker acknowledges it without running it.
func TestOnce_RunnerKilledBeforeAck(t *testing.T) {
	url := testenv.Redis(t)
	r := connect2(t, url)
	ctx := context.Background()
	q := SiteQueue(onceSite)
	if _, err := r.Enqueue(ctx, Task{ID: "j-killed", Envelope: []byte("{}"), Queue: q, MaxRetry: 3, Timeout: time.Minute}); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run", "^TestOnce_HelperKilledAfterSuccess$")
	cmd.Env = append(os.Environ(), "WRIT_ONCE_WORKER="+url)
	err := cmd.Run()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("helper worker: %v (want killed by SIGKILL after publishing)", err)
	}
	if n := succeededEvents(t, r, "j-killed"); n != 1 {
		t.Fatalf("%d succeeded events after the first run, want 1", n)
	}
	lapseLease(t, r, q, "j-killed")

	var calls atomic.Int32
	workCounting(t, r, &calls)
	taskGone(t, r, q, "j-killed")
	if calls.Load() != 0 {
		t.Errorf("the job ran %d more times after its end was published", calls.Load())
	}
	if n := succeededEvents(t, r, "j-killed"); n != 1 {
		t.Errorf("%d succeeded events, want 1", n)
	}
}

// TestOnce_SupervisorKilledBeforeQueuedMark: a supervisor claims a job's
// nonce and enqueues it, then dies before recording it as queued. The job
// runs and ends (asynq deletes the task). coord sends the job again: the
// next supervisor's admission sees that it ended and adds nothing; and a
// second task added in the window between the admission and the enqueue
// is taken out again.
func TestOnce_SupervisorKilledBeforeQueuedMark(t *testing.T) {
	r := connect2(t, testenv.Redis(t))
	ctx := context.Background()
	q := SiteQueue(onceSite)
	claim := Claim{Site: onceSite, Nonce: "n-1", JobID: "j-sup", Until: time.Now().Add(time.Hour)}
	task := Task{ID: "j-sup", Envelope: []byte("{}"), Queue: q, MaxRetry: 3, Timeout: time.Minute}
	adm, err := r.Admit(ctx, []Claim{claim})
	if err != nil || adm[0] != AdmitNew {
		t.Fatalf("first admission = %v, %v", adm, err)
	}
	if _, err := r.Enqueue(ctx, task); err != nil {
		t.Fatal(err)
	}
	// (the supervisor dies here: no Queued mark)
	var calls atomic.Int32
	workCounting(t, r, &calls)
	taskGone(t, r, q, "j-sup")
	if calls.Load() != 1 {
		t.Fatalf("the job ran %d times, want 1", calls.Load())
	}

	adm, err = r.Admit(ctx, []Claim{claim})
	if err != nil || adm[0] != AdmitEnded {
		t.Fatalf("admission of the redelivered job = %v, %v; want ended", adm, err)
	}
	// The window: the admission said in flight, then the first task ended.
	dup, ended, err := r.EnqueueUnlessEnded(ctx, onceSite, task)
	if err != nil || dup || !ended {
		t.Fatalf("EnqueueUnlessEnded of an ended job = dup %v ended %v err %v; want ended", dup, ended, err)
	}
	if _, err := asynq.NewInspectorFromRedisClient(r.rdb).GetTaskInfo(q, "j-sup"); err == nil {
		t.Error("the second task of an ended job is still in asynq")
	}
	time.Sleep(readmitDelay + time.Second)
	if calls.Load() != 1 || succeededEvents(t, r, "j-sup") != 1 {
		t.Errorf("ran %d times, %d succeeded events; want 1 and 1", calls.Load(), succeededEvents(t, r, "j-sup"))
	}

	// A job whose first task never made it into asynq is enqueued again.
	task2 := Task{ID: "j-lost", Envelope: []byte("{}"), Queue: q, MaxRetry: 3, Timeout: time.Minute}
	if dup, ended, err := r.EnqueueUnlessEnded(ctx, onceSite, task2); err != nil || dup || ended {
		t.Fatalf("EnqueueUnlessEnded of a lost job = dup %v ended %v err %v", dup, ended, err)
	}
	taskGone(t, r, q, "j-lost")
	if calls.Load() != 2 {
		t.Errorf("the lost job ran %d times, want 1", calls.Load()-1)
	}
}

// TestOnce_RedisDownAtAck: Redis goes down between a job's success event
// and asynq's acknowledgement. asynq v0.26.0 retries that acknowledgement
// with a context it has already cancelled, so the task stays active until
// its lease lapses; writ does not depend on that retry: the recovered task
// is acknowledged without running again.
func TestOnce_RedisDownAtAck(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: skipped under -short (make test runs it)")
	}
	dir := t.TempDir()
	cfg := redisproc.Config{Dir: dir, Port: testenv.FreePort(t), Log: filepath.Join(dir, "redis.log"), Persist: true}
	p, err := redisproc.Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop() })
	r := connect2(t, p.URL())
	ctx := context.Background()
	q := SiteQueue(onceSite)
	if _, err := r.Enqueue(ctx, Task{ID: "j-ack", Envelope: []byte("{}"), Queue: q, MaxRetry: 3, Timeout: time.Minute}); err != nil {
		t.Fatal(err)
	}
	var first atomic.Int32
	wctx, cancel := context.WithCancel(ctx)
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		r.Work(wctx, WorkerConfig{Site: onceSite, Queues: map[string]int{q: 1}, Concurrency: 1, Log: quiet},
			func(ctx context.Context, d Delivery) error {
				if first.Add(1) > 1 {
					return nil
				}
				if err := r.Publish(ctx, onceSite, job.Event{Job: d.ID, Type: job.EventSucceeded, Attempt: d.Attempt, At: time.Now()}); err != nil {
					t.Errorf("publish: %v", err)
				}
				p.Stop() // Redis goes down (and saves): the acknowledgement fails
				return nil
			})
	}()
	testenv.WaitFor(t, 20*time.Second, "the first run", func() bool { return first.Load() == 1 })
	// Down for longer than go-redis's own retries of the acknowledgement.
	time.Sleep(5 * time.Second)
	if p, err = redisproc.Start(cfg); err != nil {
		t.Fatal(err)
	}
	if err := r.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	insp := asynq.NewInspectorFromRedisClient(r.rdb)
	time.Sleep(2 * time.Second) // asynq's syncer retries each second
	info, err := insp.GetTaskInfo(q, "j-ack")
	if err != nil || info.State != asynq.TaskStateActive {
		t.Fatalf("after Redis came back the task is %+v (%v), want still active (asynq's acknowledgement lost)", info, err)
	}
	lapseLease(t, r, q, "j-ack")
	cancel()
	<-wdone
	var calls atomic.Int32
	workCounting(t, r, &calls)
	taskGone(t, r, q, "j-ack")
	if calls.Load() != 0 || first.Load() != 1 {
		t.Errorf("the job ran again: %d + %d more runs", first.Load()-1, calls.Load())
	}
	if n := succeededEvents(t, r, "j-ack"); n != 1 {
		t.Errorf("%d succeeded events, want 1", n)
	}
}

// connect2 connects to url (a server of the test's own).
func connect2(t *testing.T, url string) *Redis {
	t.Helper()
	r, err := Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	if err := r.WaitReady(context.Background()); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestOnce_EndedRecordStaysEnded: coord's record of a job that succeeded
// is not moved back by events of a run that should not have happened.
func TestOnce_EndedRecordStaysEnded(t *testing.T) {
	r := connect(t)
	ctx := context.Background()
	at := time.Now()
	evs := []job.Event{
		{Seq: "1-0", Job: "j", Type: job.EventStarted, Node: "n1", Attempt: 1, At: at},
		{Seq: "2-0", Job: "j", Type: job.EventSucceeded, Node: "n1", Attempt: 1, Result: []byte(`"ok"`), At: at},
		{Seq: "3-0", Job: "j", Type: job.EventStarted, Node: "n2", Attempt: 2, At: at},
		{Seq: "4-0", Job: "j", Type: job.EventLog, Message: "again", At: at},
	}
	if err := r.ApplyEvents(ctx, "s", evs, 0); err != nil {
		t.Fatal(err)
	}
	got, err := r.GetJob(ctx, "j")
	if err != nil {
		t.Fatal(err)
	}
	if got.State != job.StateSucceeded || got.Node != "n1" || got.Attempts != 1 || string(got.Result) != `"ok"` {
		t.Errorf("record after a late start = %s on %s attempt %d result %s; want succeeded on n1, attempt 1, \"ok\"", got.State, got.Node, got.Attempts, got.Result)
	}
}

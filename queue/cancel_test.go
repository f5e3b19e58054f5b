package queue

import (
	"context"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
)

// TestCancel_RunningNotRunAgain: a running job is cancelled, and its run
// takes a while to report its end. asynq hands the task back a second
// after its context was cancelled, before that end: the copy is ended
// cancelled and not run again. A queued job is removed and ends
// cancelled.
func TestCancel_RunningNotRunAgain(t *testing.T) {
	r, err := Connect(testenv.Redis(t))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	q := SiteQueue("s")
	var runs atomic.Int32
	started := make(chan struct{}, 4)
	done := make(chan error, 1)
	go func() {
		done <- r.Work(ctx, WorkerConfig{Site: "s", Queues: map[string]int{q: 1}, Concurrency: 2, Log: slog.New(slog.DiscardHandler)},
			func(hctx context.Context, d Delivery) error {
				runs.Add(1)
				started <- struct{}{}
				<-hctx.Done()
				time.Sleep(1500 * time.Millisecond) // a slow stop: the sandbox, the report
				r.Publish(context.Background(), "s", job.Event{Job: d.ID, Type: job.EventFailed, Reason: job.ReasonCancelled, At: time.Now()})
				return NoRetry(hctx.Err())
			})
	}()
	if _, err := r.Enqueue(ctx, Task{ID: "long", Envelope: []byte("{}"), Queue: q, MaxRetry: 3, Timeout: time.Minute}); err != nil {
		t.Fatal(err)
	}
	<-started
	if res, err := r.CancelJob(ctx, "s", "long", q); err != nil || res != CancelRunning {
		t.Fatalf("CancelJob of a running job = %s, %v", res, err)
	}
	time.Sleep(4 * time.Second)
	if n := runs.Load(); n != 1 {
		t.Errorf("the cancelled job ran %d times", n)
	}
	if e, _ := r.Ended(ctx, "s", "long"); !e[0] {
		t.Error("the cancelled job did not end")
	}

	// Queued (held for an hour): removed, ended cancelled.
	if _, err := r.Enqueue(ctx, Task{ID: "held", Envelope: []byte("{}"), Queue: q, MaxRetry: 3, Timeout: time.Minute, ProcessAt: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if res, err := r.CancelJob(ctx, "s", "held", q); err != nil || res != CancelQueued {
		t.Fatalf("CancelJob of a queued job = %s, %v", res, err)
	}
	if e, _ := r.Ended(ctx, "s", "held"); !e[0] {
		t.Error("the cancelled queued job did not end")
	}
	if res, _ := r.CancelJob(ctx, "s", "held", q); res != CancelEnded {
		t.Errorf("cancelling it again = %s, want ended", res)
	}
	cancel()
	<-done
}

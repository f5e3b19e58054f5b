package queue

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
)

// connect connects to a redis-server of the test's own.
func connect(t *testing.T) *Redis { return connect2(t, testenv.Redis(t)) }

func TestRedis_EnqueueWork(t *testing.T) {
	r := connect(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	runs := map[string]int{}
	var failedOnce atomic.Bool
	for i := 0; i < 20; i++ {
		dup, err := r.Enqueue(ctx, Task{ID: fmt.Sprintf("j%d", i), Envelope: []byte("{}"), Queue: SiteQueue("s"), MaxRetry: 3, Timeout: time.Minute})
		if err != nil || dup {
			t.Fatalf("Enqueue = %v, %v", dup, err)
		}
	}
	if dup, err := r.Enqueue(ctx, Task{ID: "j0", Envelope: []byte("{}"), Queue: SiteQueue("s"), MaxRetry: 3, Timeout: time.Minute}); err != nil || !dup {
		t.Errorf("second Enqueue of queued j0 = %v, %v; want dup", dup, err)
	}
	done := make(chan error, 1)
	go func() {
		done <- r.Work(ctx, WorkerConfig{Site: "s", Queues: map[string]int{SiteQueue("s"): 1}, Concurrency: 4, Log: slog.New(slog.NewTextHandler(io.Discard, nil))},
			func(ctx context.Context, d Delivery) error {
				mu.Lock()
				runs[d.ID]++
				mu.Unlock()
				if d.ID == "flaky" && failedOnce.CompareAndSwap(false, true) {
					if d.Attempt != 1 || d.LastAttempt() {
						t.Errorf("first run: attempt %d last %v", d.Attempt, d.LastAttempt())
					}
					return errors.New("transient")
				}
				if d.ID == "fatal" {
					return NoRetry(errors.New("script error"))
				}
				return nil
			})
	}()
	for _, id := range []string{"flaky", "fatal"} {
		if _, err := r.Enqueue(ctx, Task{ID: id, Envelope: []byte("{}"), Queue: SiteQueue("s"), MaxRetry: 3, Timeout: time.Minute}); err != nil {
			t.Fatal(err)
		}
	}
	testenv.WaitFor(t, 20*time.Second, "all jobs to run", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(runs) == 22 && runs["flaky"] == 2
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for id, n := range runs {
		want := 1
		if id == "flaky" {
			want = 2
		}
		if n != want {
			t.Errorf("job %s ran %d times, want %d", id, n, want)
		}
	}
}

func TestRedis_Admit(t *testing.T) {
	r := connect(t)
	ctx := context.Background()
	until := time.Now().Add(time.Hour)
	got, err := r.Admit(ctx, []Claim{{"s", "n1", "a", until}, {"s", "n2", "b", until}})
	if err != nil || got[0] != AdmitNew || got[1] != AdmitNew {
		t.Fatalf("Admit new = %v, %v", got, err)
	}
	got, _ = r.Admit(ctx, []Claim{{"s", "n1", "a", until}})
	if got[0] != AdmitInFlight {
		t.Errorf("re-admit before Queued = %v, want in-flight", got[0])
	}
	if err := r.Queued(ctx, "s", []Claim{{"s", "n1", "a", until}}, nil); err != nil {
		t.Fatal(err)
	}
	got, _ = r.Admit(ctx, []Claim{{"s", "n1", "a", until}, {"s", "n1", "other", until}, {"t", "n1", "x", until}})
	want := []Admission{AdmitDuplicate, AdmitReplay, AdmitNew}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("Admit[%d] = %v, want %v", i, got[i], want[i])
		}
	}
}

func TestRedis_EventsAndJobs(t *testing.T) {
	r := connect(t)
	ctx := context.Background()
	now := time.Now().UTC()
	// Events may arrive before coord writes the record: the record must
	// end up complete either way.
	if err := r.Publish(ctx, "s",
		job.Event{Job: "j1", Type: job.EventQueued, At: now},
		job.Event{Job: "j1", Type: job.EventStarted, At: now, Node: "n1", Attempt: 1},
		job.Event{Job: "j1", Type: job.EventLog, At: now, Level: "info", Message: "hi"},
		job.Event{Job: "j1", Type: job.EventSucceeded, At: now, Result: []byte(`{"ok":true}`)},
	); err != nil {
		t.Fatal(err)
	}
	// The supervisor's "queued" can come after a fast runner's events.
	if err := r.Publish(ctx, "s", job.Event{Job: "j1", Type: job.EventQueued, At: now}); err != nil {
		t.Fatal(err)
	}
	evs, err := r.ReadEvents(ctx, "s", "0", 100, 0)
	if err != nil || len(evs) != 5 {
		t.Fatalf("ReadEvents = %d events, %v", len(evs), err)
	}
	if err := r.ApplyEvents(ctx, "s", evs, 0); err != nil {
		t.Fatal(err)
	}
	// Applying again (a restarted coord) changes nothing.
	if err := r.ApplyEvents(ctx, "s", evs, 0); err != nil {
		t.Fatal(err)
	}
	prev, err := r.CreateJobs(ctx, []NewJobRecord{{Job: job.Record{ID: "j1", Name: "hello", Site: "s", State: job.StateQueued, SubmittedAt: now}}}, 0)
	if err != nil || prev[0] != job.StateSucceeded {
		t.Fatalf("CreateJobs = %v, %v; want existing state succeeded", prev, err)
	}
	j, err := r.GetJob(ctx, "j1")
	if err != nil {
		t.Fatal(err)
	}
	if j.State != job.StateSucceeded || j.Name != "hello" || j.Node != "n1" || j.Attempts != 1 || string(j.Result) != `{"ok":true}` || j.StartedAt == nil {
		t.Errorf("GetJob = %+v", j)
	}
	hist, _ := r.JobEvents(ctx, "j1")
	if len(hist) != 5 {
		t.Errorf("JobEvents = %d, want 5 (no duplicates from the second apply)", len(hist))
	}
	cur, _ := r.Cursor(ctx, "s")
	if cur != evs[4].Seq {
		t.Errorf("Cursor = %s, want %s", cur, evs[4].Seq)
	}
	if _, err := r.GetJob(ctx, "nope"); !errors.Is(err, ErrNoJob) {
		t.Errorf("GetJob(nope) = %v, want ErrNoJob", err)
	}
	// Listing with filters and pages.
	var recs []NewJobRecord
	for i := 0; i < 25; i++ {
		st := job.StateQueued
		if i%5 == 0 {
			st = job.StateRejected
		}
		recs = append(recs, NewJobRecord{Job: job.Record{ID: fmt.Sprintf("k%02d", i), Name: "k", Site: "t", State: st, SubmittedAt: now.Add(time.Duration(i) * time.Millisecond)}})
	}
	if _, err := r.CreateJobs(ctx, recs, 0); err != nil {
		t.Fatal(err)
	}
	page, next, err := r.ListJobs(ctx, ListFilter{Site: "t", Limit: 10})
	if err != nil || len(page) != 10 || page[0].ID != "k24" || next == 0 {
		t.Fatalf("ListJobs page 1 = %d jobs first %v next %d err %v", len(page), page, next, err)
	}
	page2, _, _ := r.ListJobs(ctx, ListFilter{Site: "t", Limit: 10, Before: next})
	if len(page2) != 10 || page2[0].ID != "k14" {
		t.Errorf("ListJobs page 2 first = %v", page2)
	}
	rej, _, _ := r.ListJobs(ctx, ListFilter{Site: "t", State: job.StateRejected, Limit: 100})
	if len(rej) != 5 {
		t.Errorf("rejected jobs = %d, want 5", len(rej))
	}
	// Pending deliveries.
	if _, err := r.CreateJobs(ctx, []NewJobRecord{{Job: job.Record{ID: "p1", Site: "s", State: job.StatePending, SubmittedAt: now}, Envelope: []byte("ENV")}}, 0); err != nil {
		t.Fatal(err)
	}
	due, _ := r.DuePending(ctx, time.Now().Add(time.Second), 10)
	if len(due) != 1 || string(due[0].Envelope) != "ENV" {
		t.Fatalf("DuePending = %v", due)
	}
	r.RetryPendingAt(ctx, "p1", time.Now().Add(time.Hour))
	if due, _ := r.DuePending(ctx, time.Now(), 10); len(due) != 0 {
		t.Errorf("rescheduled delivery still due: %v", due)
	}
	r.DonePending(ctx, "p1")
	if due, _ := r.DuePending(ctx, time.Now().Add(2*time.Hour), 10); len(due) != 0 {
		t.Errorf("done delivery still listed: %v", due)
	}
}

package coord

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
)

func TestSeqAfter(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want bool
	}{
		{"2-0", "1-9", true},
		{"1-10", "1-9", true},
		{"1-9", "1-9", false},
		{"1-9", "1-10", false},
		{"10-0", "9-0", true},
		{"1-0", "0-0", true},
	} {
		if got := seqAfter(tc.a, tc.b); got != tc.want {
			t.Errorf("seqAfter(%s, %s) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}

func TestHub_SlowSubscriberDoesNotBlock(t *testing.T) {
	h := newHub()
	ch, cancel := h.subscribe("j")
	defer cancel()
	done := make(chan struct{})
	go func() {
		for i := 0; i < 1000; i++ {
			h.publish(job.Event{Job: "j", Type: job.EventLog})
		}
		h.publish(job.Event{Job: "other"})
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("publish blocked on a subscriber that does not read")
	}
	if len(ch) != cap(ch) {
		t.Errorf("subscriber has %d of %d buffered events", len(ch), cap(ch))
	}
}

// fakeSupervisor answers batches with verdicts from judge, or 503 while down.
type fakeSupervisor struct {
	down  atomic.Bool
	judge func(spec *envelope.Job) job.Verdict
}

func (f *fakeSupervisor) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v1/events" {
		// No events; the follower reconnects with backoff.
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		return
	}
	if f.down.Load() {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	var raws []json.RawMessage
	body, _ := io.ReadAll(r.Body)
	json.Unmarshal(body, &raws)
	out := make([]job.Verdict, len(raws))
	for i, raw := range raws {
		env, spec, err := envelope.Parse(raw)
		if err != nil {
			out[i] = job.Verdict{State: job.VerdictRejected, Reason: "malformed", Error: err.Error()}
			continue
		}
		out[i] = f.judge(spec)
		out[i].ID = env.ID()
	}
	json.NewEncoder(w).Encode(out)
}

func TestCoord_Submit(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	fs := &fakeSupervisor{judge: func(j *envelope.Job) job.Verdict {
		if j.Name == "bad" {
			return job.Verdict{State: job.VerdictRejected, Reason: "script_invalid", Error: "does not compile"}
		}
		return job.Verdict{State: job.VerdictQueued}
	}}
	sup := httptest.NewServer(fs)
	defer sup.Close()
	l := testenv.NewLedger(t, ledger.Site{Name: "s", SupervisorURL: sup.URL})
	admin := l.Admin
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	rdb, err := queue.Connect(testenv.Redis(t))
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	lc := &ledger.Client{BaseURL: l.URL}
	c, err := New(Params{Redis: rdb, Ledger: lc, Trust: &ledger.TrustCache{Client: lc}, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	runDone := make(chan struct{})
	go func() { c.Run(ctx); close(runDone) }()
	// Deferred last, so it runs first: stop coord's background duties
	// before the servers and Redis they talk to.
	defer func() { cancel(); <-runDone }()
	hs := httptest.NewServer(c.Handler())
	defer hs.Close()
	cl := &Client{BaseURL: hs.URL, Key: admin}

	sign := func(name, site string) []byte {
		j := envelope.NewJob(name, "x := 1", site, time.Now())
		env, _ := j.Sign(admin)
		raw, _ := json.Marshal(env)
		return raw
	}
	rep, err := cl.Submit(ctx, sign("good", "s"))
	if err != nil || rep.State != "queued" {
		t.Fatalf("good = %+v, %v", rep, err)
	}
	_, err = cl.Submit(ctx, sign("bad", "s"))
	var re *RejectedError
	if !errors.As(err, &re) || re.Reply.Reason != "script_invalid" || re.Status != http.StatusUnprocessableEntity {
		t.Fatalf("bad = %v", err)
	}
	if j, err := cl.Job(ctx, re.Reply.ID, 0); err != nil || j.State != job.StateRejected || j.Error != "does not compile" {
		t.Errorf("rejected job record = %+v, %v", j, err)
	}
	_, err = cl.Submit(ctx, sign("nowhere", "unknown-site"))
	if !errors.As(err, &re) || re.Reply.Reason != job.ReasonWrongSite {
		t.Errorf("unknown site = %v", err)
	}
	// A site created right after coord missed it works at once: coord
	// asks the ledger again before refusing.
	admc := &ledger.Client{BaseURL: l.URL, Key: admin}
	if err := admc.PutSite(ctx, ledger.Site{Name: "fresh", SupervisorURL: sup.URL, Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}}); err != nil {
		t.Fatal(err)
	}
	if rep, err := cl.Submit(ctx, sign("new site", "fresh")); err != nil || rep.State != "queued" {
		t.Errorf("job for a site created a moment ago = %+v, %v; want queued", rep, err)
	}
	stranger, _ := keys.Generate("x")
	j := envelope.NewJob("stranger", "x := 1", "s", time.Now())
	env, _ := j.Sign(stranger)
	raw, _ := json.Marshal(env)
	if _, err := cl.Submit(ctx, raw); !errors.As(err, &re) || re.Reply.Reason != job.ReasonUnknownKey {
		t.Errorf("unknown key = %v", err)
	}

	// Supervisor down: pending, then delivered by the deliverer.
	fs.down.Store(true)
	rep, err = cl.Submit(ctx, sign("later", "s"))
	if err != nil || rep.State != "pending" {
		t.Fatalf("submit while down = %+v, %v", rep, err)
	}
	fs.down.Store(false)
	testenv.WaitFor(t, 10*time.Second, "the pending job to be delivered", func() bool {
		j, err := cl.Job(ctx, rep.ID, 0)
		return err == nil && j.State == job.StateQueued
	})
	list, err := cl.Jobs(ctx, queue.ListFilter{Site: "s"})
	// good, bad (refused by the supervisor) and later; not the stranger's
	// (coord keeps no record of an envelope whose signatures failed).
	if err != nil || len(list.Jobs) != 3 {
		t.Errorf("jobs of site s = %d, %v; want 3", len(list.Jobs), err)
	}
}

// heldSupervisor queues every job it is sent, but answers a batch only once
// release is closed.
type heldSupervisor struct {
	inFlight atomic.Int32
	release  chan struct{}
}

func (h *heldSupervisor) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v1/events" {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		return
	}
	var raws []json.RawMessage
	body, _ := io.ReadAll(r.Body)
	json.Unmarshal(body, &raws)
	h.inFlight.Add(1)
	<-h.release
	out := make([]job.Verdict, len(raws))
	for i, raw := range raws {
		env, _ := envelope.Decode(raw)
		out[i] = job.Verdict{ID: env.ID(), State: job.VerdictQueued}
	}
	json.NewEncoder(w).Encode(out)
}

// TestCoord_Run_Shutdown: when coord stops, the batches in flight finish
// and the jobs still waiting for a sender are recorded pending (so they are
// delivered later), not lost; a job submitted afterwards is refused with
// 503, not left hanging.
func TestCoord_Run_Shutdown(t *testing.T) {
	hs := &heldSupervisor{release: make(chan struct{})}
	sup := httptest.NewServer(hs)
	defer sup.Close()
	l := testenv.NewLedger(t, ledger.Site{Name: "s", SupervisorURL: sup.URL})
	rdb, err := queue.Connect(testenv.Redis(t))
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	lc := &ledger.Client{BaseURL: l.URL}
	c, err := New(Params{Redis: rdb, Ledger: lc, Trust: &ledger.TrustCache{Client: lc}, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runDone := make(chan error, 1)
	go func() { runDone <- c.Run(ctx) }()
	api := httptest.NewServer(c.Handler())
	defer api.Close()
	cl := &Client{BaseURL: api.URL, Key: l.Admin}

	const n = senders + 2 // every sender holds a batch, two jobs wait
	replies := make(chan SubmitReply, n)
	for i := 0; i < n; i++ {
		raw := func() []byte {
			env, _ := envelope.NewJob(fmt.Sprint("j", i), "x := 1", "s", time.Now()).Sign(l.Admin)
			b, _ := json.Marshal(env)
			return b
		}()
		go func() {
			rep, err := cl.Submit(context.Background(), raw)
			if err != nil {
				t.Errorf("submit: %v", err)
			}
			replies <- rep
		}()
		if i < senders {
			testenv.WaitFor(t, 10*time.Second, "a batch in flight", func() bool { return int(hs.inFlight.Load()) == i+1 })
		}
	}
	c.mu.Lock()
	f := c.forwarders["s"]
	c.mu.Unlock()
	testenv.WaitFor(t, 10*time.Second, "two jobs waiting for a sender", func() bool { return len(f.in) == 2 })

	cancel()
	close(hs.release)
	states := map[string]int{}
	for i := 0; i < n; i++ {
		select {
		case rep := <-replies:
			states[rep.State]++
			j, err := cl.Job(context.Background(), rep.ID, 0)
			if err != nil || string(j.State) != rep.State {
				t.Errorf("record of %s = %+v, %v; want state %s", rep.ID, j, err, rep.State)
			}
		case <-time.After(time.Minute):
			t.Fatal("a submission was left hanging by the shutdown")
		}
	}
	if states["queued"] != senders || states["pending"] != 2 {
		t.Errorf("states after shutdown = %v, want %d queued and 2 pending", states, senders)
	}
	if err := <-runDone; err != nil {
		t.Errorf("Run = %v", err)
	}
	if due, err := rdb.DuePending(context.Background(), time.Now().Add(time.Hour), 10); err != nil || len(due) != 2 {
		t.Errorf("pending deliveries = %d, %v; want the 2 waiting jobs", len(due), err)
	}
	env, _ := envelope.NewJob("late", "x := 1", "s", time.Now()).Sign(l.Admin)
	raw, _ := json.Marshal(env)
	if _, err := cl.Submit(context.Background(), raw); err == nil || !strings.Contains(err.Error(), "503") {
		t.Errorf("submit after shutdown = %v, want 503", err)
	}
}

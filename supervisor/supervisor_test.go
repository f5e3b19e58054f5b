package supervisor

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/scripts"
	"github.com/writ-fleet/writ/verify"
)

// trustClock is the clock of every newSupervisor's trust cache.
var trustClock = testenv.NewClock()

func newSupervisor(t *testing.T) (*Supervisor, *queue.Redis, *keys.Key, *httptest.Server) {
	t.Helper()
	l := testenv.NewLedger(t, ledger.Site{Name: "s", SupervisorURL: "http://127.0.0.1:1"})
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	rdb, err := queue.Connect(testenv.Redis(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	sup, err := New(Params{Site: "s", Trust: &ledger.TrustCache{Client: &ledger.Client{BaseURL: l.URL}, Now: trustClock.Now}, Redis: rdb, Scripts: scripts.New(scripts.Config{}, nil), Log: log})
	if err != nil {
		t.Fatal(err)
	}
	return sup, rdb, l.Admin, l.Server
}

func signed(t *testing.T, k *keys.Key, mut func(*envelope.Job)) []byte {
	t.Helper()
	j := envelope.NewJob("t", `job := import("job"); job.result(1)`, "s", time.Now())
	if mut != nil {
		mut(j)
	}
	env, err := j.Sign(k)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(env)
	return raw
}

func TestSupervisor_Submit(t *testing.T) {
	sup, rdb, admin, _ := newSupervisor(t)
	ctx := context.Background()
	good := signed(t, admin, nil)
	var replay []byte
	{
		j := envelope.NewJob("t", `x := 1`, "s", time.Now())
		j2 := *j
		j2.Name = "other"
		a, _ := j.Sign(admin)
		b, _ := j2.Sign(admin)
		ra, _ := json.Marshal(a)
		replay, _ = json.Marshal(b)
		if v := sup.Submit(ctx, [][]byte{ra})[0]; v.State != job.VerdictQueued {
			t.Fatalf("first of the nonce pair = %+v", v)
		}
	}
	pinned := signed(t, admin, func(j *envelope.Job) { j.Node = "n7" })
	got := sup.Submit(ctx, [][]byte{good, good, replay, pinned, []byte("{"), signed(t, admin, func(j *envelope.Job) { j.Site = "other" })})
	// The same envelope twice in one batch: its two copies are enqueued
	// concurrently, so either may be the one queued; the other must be a
	// duplicate.
	if a, b := got[0].State, got[1].State; !(a == job.VerdictQueued && b == job.VerdictDuplicate || a == job.VerdictDuplicate && b == job.VerdictQueued) {
		t.Errorf("the same envelope twice in a batch = %s and %s, want one queued and one duplicate", a, b)
	}
	want := []struct {
		state  string
		reason job.Reason
	}{
		{"", ""},
		{"", ""},
		{job.VerdictRejected, job.ReasonReplayed},
		{job.VerdictQueued, ""},
		{job.VerdictRejected, job.ReasonMalformed},
		{job.VerdictRejected, job.ReasonWrongSite},
	}
	for i, w := range want {
		if w.state == "" {
			continue
		}
		if got[i].State != w.state || got[i].Reason != w.reason {
			t.Errorf("verdict %d = %+v, want %s %s", i, got[i], w.state, w.reason)
		}
	}
	// Once more, later: a duplicate, enqueued nowhere.
	if v := sup.Submit(ctx, [][]byte{good})[0]; v.State != job.VerdictDuplicate {
		t.Errorf("resubmission = %+v, want duplicate", v)
	}
	depth, err := rdb.QueueDepth(queue.SiteQueue("s"), queue.NodeQueue("n7"))
	if err != nil {
		t.Fatal(err)
	}
	if depth[queue.SiteQueue("s")] != 2 || depth[queue.NodeQueue("n7")] != 1 {
		t.Errorf("queue depths = %v, want site:s 2 and node:n7 1", depth)
	}
	evs, err := rdb.ReadEvents(ctx, "s", "0", 100, 0)
	if err != nil || len(evs) != 3 {
		t.Errorf("queued events = %d, %v; want 3", len(evs), err)
	}
}

func TestSupervisor_HTTP(t *testing.T) {
	sup, _, admin, ledgerServer := newSupervisor(t)
	hs := httptest.NewServer(sup.Handler())
	defer hs.Close()
	post := func(path, body string) (int, string) {
		resp, err := http.Post(hs.URL+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := post("/v1/jobs", string(signed(t, admin, nil))); code != http.StatusAccepted || !strings.Contains(body, `"queued"`) {
		t.Errorf("POST good = %d %s", code, body)
	}
	if code, body := post("/v1/jobs", string(signed(t, admin, func(j *envelope.Job) { j.Script = `os := import("os")` }))); code != http.StatusUnprocessableEntity || !strings.Contains(body, "forbidden_import") {
		t.Errorf("POST forbidden import = %d %s", code, body)
	}
	// A script with more globals than Tengo's VM holds made its compiler
	// panic inside the supervisor's checks, and the supervisor died.
	var many strings.Builder
	for i := 0; i < 1100; i++ {
		fmt.Fprintf(&many, "g%d := %d\n", i, i)
	}
	if code, body := post("/v1/jobs", string(signed(t, admin, func(j *envelope.Job) { j.Script = many.String() }))); code != http.StatusUnprocessableEntity || !strings.Contains(body, "too_complex") {
		t.Errorf("POST 1100 globals = %d %s", code, body)
	}
	if code, body := post("/v1/jobs/batch", "not json"); code != http.StatusBadRequest || !strings.Contains(body, "JSON array") {
		t.Errorf("POST batch garbage = %d %s", code, body)
	}
	// The ledger going away makes judging impossible: a retryable 503, not
	// a rejection.
	ledgerServer.Close()
	// A snapshot younger than a second is authoritative; past that, a key
	// it does not know needs the ledger.
	trustClock.Add(1100 * time.Millisecond)
	stranger, _ := keys.Generate("x")
	if code, body := post("/v1/jobs", string(signed(t, stranger, nil))); code != http.StatusServiceUnavailable || !strings.Contains(body, `"retry":true`) {
		t.Errorf("POST with the ledger down = %d %s", code, body)
	}
}

// TestSupervisor_Steps: a step of a flow is admitted once per run under its
// derived job ID; one held by its not_before is scheduled for then; one of
// another site's, or whose flow is not signed well enough, is refused.
func TestSupervisor_Steps(t *testing.T) {
	sup, rdb, admin, _ := newSupervisor(t)
	ctx := context.Background()
	fl := envelope.NewFlow("f", "s", time.Now())
	fl.Steps = []envelope.Step{
		{Name: "now", Script: `x := 1`},
		{Name: "later", Script: `x := 2`, NotBefore: time.Now().Add(time.Hour).Truncate(time.Second)},
		{Name: "there", Script: `x := 3`, Site: "other"},
	}
	env, err := fl.Sign(admin)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(env)
	task := func(step string) []byte {
		b, _ := json.Marshal(verify.StepTask{Flow: raw, Step: step, Attempt: 1})
		return b
	}
	// A batch carries the flow once: its other steps name it.
	byRef := func(step, ref string) []byte {
		b, _ := verify.RefStepTask(verify.StepTask{Step: step, Attempt: 1}, ref)
		return b
	}
	got := sup.Submit(ctx, [][]byte{task("now"), byRef("later", env.ID()), task("there"), []byte(`{"flow":{},"shell":1}`), byRef("now", strings.Repeat("0", 64))})
	want := []struct {
		state  string
		reason job.Reason
	}{
		{job.VerdictQueued, ""}, {job.VerdictQueued, ""},
		{job.VerdictRejected, job.ReasonWrongSite}, {job.VerdictRejected, job.ReasonMalformed},
		{job.VerdictRejected, job.ReasonMalformed}, // a flow neither the batch nor the site has
	}
	for i, w := range want {
		if got[i].State != w.state || got[i].Reason != w.reason {
			t.Errorf("verdict %d = %+v, want %s %s", i, got[i], w.state, w.reason)
		}
	}
	nowID, laterID := envelope.StepJobID(env.ID(), "now", 0, 1), envelope.StepJobID(env.ID(), "later", 0, 1)
	if got[0].ID != nowID || got[1].ID != laterID {
		t.Errorf("verdict IDs %s %s, want the derived ones", got[0].ID, got[1].ID)
	}
	if v := sup.Submit(ctx, [][]byte{task("now")})[0]; v.State != job.VerdictDuplicate {
		t.Errorf("the step again = %+v, want duplicate", v)
	}
	for id, state := range map[string]string{nowID: "pending", laterID: "scheduled"} {
		if got, err := rdb.TaskState(queue.SiteQueue("s"), id); err != nil || got != state {
			t.Errorf("task %s = %s, %v; want %s", id[:8], got, err, state)
		}
	}
	// The site keeps the flow once; a later batch's step may name it.
	if kept, err := rdb.SiteFlowEnvelope(ctx, "s", env.ID()); err != nil || !bytes.Equal(kept, raw) {
		t.Errorf("kept flow = %d bytes, %v; want the envelope", len(kept), err)
	}
	if v := sup.Submit(ctx, [][]byte{byRef("now", env.ID())})[0]; v.State != job.VerdictDuplicate {
		t.Errorf("the step again, by reference = %+v, want duplicate", v)
	}
	// A worker is handed the step with its flow back in, as signed.
	wctx, cancel := context.WithCancel(ctx)
	worked := make(chan struct{})
	defer func() { cancel(); <-worked }() // before the Redis client closes (asynq's subscriber panics on a closed one)
	got1 := make(chan queue.Delivery, 1)
	go func() {
		defer close(worked)
		rdb.Work(wctx, queue.WorkerConfig{Site: "s", Queues: map[string]int{queue.SiteQueue("s"): 1}, Concurrency: 1, Log: slog.New(slog.NewTextHandler(io.Discard, nil))},
			func(_ context.Context, d queue.Delivery) error {
				select {
				case got1 <- d:
				default:
				}
				return nil
			})
	}()
	select {
	case d := <-got1:
		task, ok, err := verify.ParseStepTask(d.Envelope)
		if !ok || err != nil || task.FlowRef != "" || !bytes.Equal(task.Flow, raw) || d.ID != nowID {
			t.Errorf("delivered %s: %s (%v)", d.ID[:8], d.Envelope[:min(len(d.Envelope), 200)], err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the step was not delivered")
	}
}

// TestStepNonce_NoJobCanClaimIt: a flow step's replay-guard nonce is
// outside the grammar of a signed job's nonce, so a plain job cannot
// squat it (as "step-<id>" could, before).
func TestStepNonce_NoJobCanClaimIt(t *testing.T) {
	id := envelope.StepJobID("f", "s", 0, 1)
	j := envelope.NewJob("squat", "x := 1", "local", time.Now())
	j.Nonce = StepNonce(id)
	if err := j.Validate(); envelope.ReasonOf(err) != job.ReasonInvalidJob {
		t.Errorf("a job with nonce %q: Validate = %v, want invalid_job", j.Nonce, err)
	}
	j.Nonce = "step-" + id // what the old nonce was: a job may use it, and no step does now
	if err := j.Validate(); err != nil || j.Nonce == StepNonce(id) {
		t.Errorf("a job with nonce %q: Validate = %v", j.Nonce, err)
	}
}

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/flow"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/verify"
)

// TestFleet_Flows: flows through real processes (coord, supervisor,
// runner): a fan-out over an earlier step's output and a fan-in that
// combines the items' outputs; a failing step that skips its dependent,
// fails the flow and runs finally; a step that fails once and succeeds on
// its retry; writ flow run; a step task altered in Redis, refused by the
// runner; and a flow below its site's threshold, refused before anything
// runs.
func TestFleet_Flows(t *testing.T) {
	slow(t)
	t.Parallel()
	f := newFleet(t)
	f.startAll()
	ctx := context.Background()
	cl := f.client()
	submit := func(fl *envelope.Flow, signers ...*keys.Key) (*coord.FlowReply, error) {
		t.Helper()
		env, err := fl.Sign(signers[0])
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range signers[1:] {
			env.Sign(k.ID, k.Private)
		}
		raw, _ := json.Marshal(env)
		return cl.SubmitFlow(ctx, raw)
	}
	wait := func(id string) *coord.FlowReply {
		t.Helper()
		var rep *coord.FlowReply
		testenv.WaitFor(t, 2*time.Minute, "flow "+id[:8]+" to end", func() bool {
			var err error
			rep, err = cl.Flow(ctx, id)
			return err == nil && (rep.State == flow.StateSucceeded || rep.State == flow.StateFailed || rep.State == flow.StateCancelled)
		})
		return rep
	}

	// Fan-out and fan-in.
	fan := envelope.NewFlow("fan", "local", time.Now())
	fan.Steps = []envelope.Step{
		{Name: "fetch", Script: `job := import("job"); job.result(["a", "b", "c"])`},
		{Name: "each", Script: `job := import("job"); job.result(job.item + "!")`, DependsOn: []string{"fetch"}, ForEach: json.RawMessage(`"fetch"`)},
		{Name: "combine", Script: `text := import("text"); job := import("job"); job.result(text.join(job.inputs.each, "+"))`, DependsOn: []string{"each"}},
	}
	rep, err := submit(fan, f.admin)
	if err != nil {
		t.Fatal(err)
	}
	// Its event stream, followed from the start: each step's summary as
	// it changes, then the flow's end.
	var events []coord.FlowStreamEvent
	watched := make(chan error, 1)
	go func() {
		wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		watched <- cl.WatchFlow(wctx, rep.ID, func(ev coord.FlowStreamEvent) bool {
			events = append(events, ev)
			return true
		})
	}()
	done := wait(rep.ID)
	if err := <-watched; err != nil {
		t.Fatalf("watch the fan flow: %v", err)
	}
	checkFlowStream(t, events, map[string]int{"fetch": 1, "each": 3, "combine": 1}, flow.StateSucceeded)
	if done.State != flow.StateSucceeded || string(done.Outputs["combine"]) != `"a!+b!+c!"` || string(done.Outputs["each"]) != `["a!","b!","c!"]` {
		t.Fatalf("fan flow = %s, outputs %v, run %+v", done.State, done.Outputs, done.Run)
	}
	// Each step ran once: its job's record is there, under its derived ID.
	for i := range 3 {
		j, err := cl.Job(ctx, envelope.StepJobID(rep.ID, "each", i, 1), 0)
		if err != nil || j.State != "succeeded" || j.Attempts != 1 {
			t.Errorf("each[%d]'s job = %+v, %v", i, j, err)
		}
	}

	// A failure: its dependent is skipped, finally runs and sees it.
	bad := envelope.NewFlow("bad", "local", time.Now())
	bad.Steps = []envelope.Step{
		{Name: "flaky", Script: `job := import("job"); if job.attempt == 1 { job.fail("first time") }; job.result(job.attempt)`, Retries: 1},
		{Name: "boom", Script: `job := import("job"); job.fail("boom")`},
		{Name: "after", Script: `x := 1`, DependsOn: []string{"boom"}},
	}
	bad.Finally = &envelope.Step{Name: "report", Script: `job := import("job"); job.result(job.inputs.flow)`}
	rep, err = submit(bad, f.admin)
	if err != nil {
		t.Fatal(err)
	}
	done = wait(rep.ID)
	var outcome struct {
		State  string
		Failed []string
		Steps  map[string]string
	}
	json.Unmarshal(done.Run.Finally.Out, &outcome)
	switch {
	case done.State != flow.StateFailed:
		t.Errorf("bad flow = %s", done.State)
	case done.Run.Steps["after"].State != flow.StateSkipped || done.Run.Steps["boom"].State != flow.StateFailed:
		t.Errorf("steps = %+v", done.Run.Steps)
	case done.Run.Steps["flaky"].State != flow.StateSucceeded || string(done.Outputs["flaky"]) != "2":
		t.Errorf("the retried step = %+v, output %s", done.Run.Steps["flaky"], done.Outputs["flaky"])
	case outcome.State != flow.StateFailed || len(outcome.Failed) != 1 || outcome.Failed[0] != "boom":
		t.Errorf("finally saw %s", done.Run.Finally.Out)
	case !strings.Contains(done.Run.Steps["boom"].Error, "boom"):
		t.Errorf("boom's error = %q", done.Run.Steps["boom"].Error)
	}

	// writ flow run: the example flow, its outputs as JSON on stdout.
	cmd := exec.Command(writBin, "flow", "run", "../flow/testdata/example.yaml", "--site", "local", "--coord", f.coord, "--key", filepath.Join(f.dir, "admin.key"))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var outputs struct {
		Combine struct {
			Doubled int
			Items   []string
		}
	}
	if err != nil || json.Unmarshal(out, &outputs) != nil || outputs.Combine.Doubled != 6 || strings.Join(outputs.Combine.Items, ",") != "a!,b!,c!" {
		t.Errorf("writ flow run = %v\nstdout %s\nstderr %s", err, out, stderr.String())
	}
	if !strings.Contains(stderr.String(), "each") || !strings.Contains(stderr.String(), "succeeded 3/3") {
		t.Errorf("writ flow run's progress:\n%s", stderr.String())
	}
	cmd = exec.Command(writBin, "flow", "run", "-", "--site", "local", "--coord", f.coord, "--key", filepath.Join(f.dir, "admin.key"))
	if err := cmd.Run(); err == nil {
		t.Error("writ flow run of a missing file succeeded")
	}

	// A step task altered in Redis (someone with the site's Redis password
	// rewrote a script, and gave the task the ID derived for the altered
	// flow) is refused by the runner: the flow's signatures do not cover it.
	rdb, err := queue.Connect(f.redis)
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	victim := envelope.NewFlow("victim", "local", time.Now())
	victim.Steps = []envelope.Step{{Name: "x", Script: `job := import("job"); job.result("signed")`}}
	venv, _ := victim.Sign(f.admin)
	forged := *venv
	forged.Payload = []byte(strings.Replace(string(venv.Payload), `job.result(\"signed\")`, `job.result(\"forged\")`, 1))
	if string(forged.Payload) == string(venv.Payload) {
		t.Fatal("the forgery did not apply")
	}
	forgedRaw, _ := json.Marshal(&forged)
	forgedID := envelope.StepJobID(forged.ID(), "x", 0, 1)
	task, _ := json.Marshal(verify.StepTask{Flow: forgedRaw, Step: "x", Attempt: 1})
	if _, err := rdb.Enqueue(ctx, queue.Task{ID: forgedID, Envelope: task, Queue: queue.SiteQueue("local"), MaxRetry: 0, Timeout: time.Minute}); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 30*time.Second, "the runner to refuse the forged step", func() bool {
		evs, err := rdb.ReadEvents(ctx, "local", "0", 10000, 0)
		if err != nil {
			return false
		}
		for _, ev := range evs {
			if ev.Job == forgedID && ev.Type.Terminal() {
				if ev.Type != job.EventFailed || ev.Reason != job.ReasonBadSignature {
					t.Errorf("the forged step ended %s %s %s", ev.Type, ev.Reason, ev.Error)
				}
				return true
			}
		}
		return false
	})

	// Below the threshold: refused, nothing recorded, nothing run.
	if err := f.lc.PutSite(ctx, ledger.Site{Name: "local", SupervisorURL: "https://" + testenv.Addr(f.ports["supervisor:local"]),
		Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 2}}); err != nil {
		t.Fatal(err)
	}
	two := envelope.NewFlow("two", "local", time.Now())
	two.Steps = []envelope.Step{{Name: "x", Script: `x := 1`}}
	var fre *coord.FlowRejectedError
	testenv.WaitFor(t, 30*time.Second, "coord to see the new threshold", func() bool {
		_, err := submit(two, f.admin)
		return errors.As(err, &fre) && fre.Reply.Reason == job.ReasonBelowThreshold
	})
}

// TestFleet_FlowCoordKilled: coord is killed -9 while a flow's fan-out
// runs; a new coord resumes the flow, which completes with every step
// completed once. A step held by not_before starts no earlier.
func TestFleet_FlowCoordKilled(t *testing.T) {
	slow(t)
	t.Parallel()
	f := newFleet(t)
	f.startAll()
	ctx := context.Background()
	cl := f.client()
	hold := time.Now().Add(20 * time.Second).Truncate(time.Second)
	fl := envelope.NewFlow("resume", "local", time.Now())
	fl.Steps = []envelope.Step{
		{Name: "slow", Script: `times := import("times"); job := import("job"); times.sleep(3 * times.second); job.result(job.item * 10)`, ForEach: json.RawMessage(`[1,2,3,4]`)},
		{Name: "sum", Script: `job := import("job"); s := 0; for v in job.inputs.slow { s += v }; job.result(s)`, DependsOn: []string{"slow"}},
		{Name: "held", Script: `job := import("job"); job.result("late")`, DependsOn: []string{"sum"}, NotBefore: hold},
	}
	env, err := fl.Sign(f.admin)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(env)
	rep, err := cl.SubmitFlow(ctx, raw)
	if err != nil {
		t.Fatal(err)
	}
	// Kill coord while the fan-out runs, before any of it ends.
	time.Sleep(time.Second)
	f.stop(f.procs["coord"], syscall.SIGKILL)
	time.Sleep(4 * time.Second) // the fan-out ends while no coord is up
	f.startCoord()

	var done *coord.FlowReply
	testenv.WaitFor(t, 2*time.Minute, "the flow to end after coord's restart", func() bool {
		done, err = cl.Flow(ctx, rep.ID)
		return err == nil && (done.State == flow.StateSucceeded || done.State == flow.StateFailed)
	})
	if done.State != flow.StateSucceeded || string(done.Outputs["sum"]) != "100" || string(done.Outputs["held"]) != `"late"` {
		t.Fatalf("flow = %s, outputs %v, run %+v", done.State, done.Outputs, done.Run)
	}
	for step, n := range map[string]int{"slow": 4, "sum": 1, "held": 1} {
		for i := range n {
			j, err := cl.Job(ctx, envelope.StepJobID(rep.ID, step, i, 1), 0)
			if err != nil || j.State != "succeeded" || j.Attempts != 1 {
				t.Errorf("%s[%d]'s job = %+v, %v; want succeeded once", step, i, j, err)
			}
			if step == "held" && (j.StartedAt == nil || j.StartedAt.Before(hold)) {
				t.Errorf("the held step started at %v, before its not_before %s", j.StartedAt, hold)
			}
		}
	}
}

// TestFleet_FlowTwoSites: one flow whose steps run on two sites, the
// second reading the first's output; the second site's supervisor comes up
// only once its step waits for it in coord.
func TestFleet_FlowTwoSites(t *testing.T) {
	slow(t)
	t.Parallel()
	f := newFleet(t)
	f.startSupervisor("local")
	f.startCoord()
	ctx := context.Background()
	f.ports["supervisor:other"] = testenv.FreePort(t)
	if err := f.lc.PutSite(ctx, ledger.Site{Name: "other", SupervisorURL: "https://" + testenv.Addr(f.ports["supervisor:other"]),
		Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}}); err != nil {
		t.Fatal(err)
	}
	// Both runners are registered nodes: each signs its steps' outputs,
	// and takes only inputs a node of the producing step's site signed.
	localKey, localNode := f.registerNode("local")
	otherKey, _ := f.registerNode("other")
	for name, a := range map[string][]string{"runner:local": {"--site", "local", "--node-key", localKey}, "runner:other": {"--site", "other", "--node-key", otherKey}} {
		f.start(name, append([]string{"runner"}, append(a, "--redis", f.redis, "--ledger", f.ledger, "--listen", "",
			"--concurrency", "2", "--trust-ttl", "1s", "--no-network", "--no-vm")...)...)
	}
	fl := envelope.NewFlow("two-sites", "local", time.Now())
	fl.Steps = []envelope.Step{
		{Name: "here", Script: `job := import("job"); job.result(job.site)`},
		{Name: "there", Script: `job := import("job"); job.result(job.inputs.here + " then " + job.site)`, DependsOn: []string{"here"}, Site: "other"},
	}
	env, err := fl.Sign(f.admin)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(env)
	cl := f.client()
	var rep *coord.FlowReply
	// coord learns of the new site from the ledger within its refresh.
	testenv.WaitFor(t, 30*time.Second, "coord to take the flow", func() bool {
		rep, err = cl.SubmitFlow(ctx, raw)
		return err == nil
	})
	// The second site's supervisor is not up yet: its step waits in
	// coord (pending), and is delivered once it is.
	testenv.WaitFor(t, time.Minute, "the second site's step to wait", func() bool {
		j, err := cl.Job(ctx, envelope.StepJobID(rep.ID, "there", 0, 1), 0)
		return err == nil && j.State == "pending"
	})
	f.startSupervisor("other")
	var done *coord.FlowReply
	testenv.WaitFor(t, 2*time.Minute, "the flow to end", func() bool {
		done, err = cl.Flow(ctx, rep.ID)
		return err == nil && (done.State == flow.StateSucceeded || done.State == flow.StateFailed)
	})
	if done.State != flow.StateSucceeded || string(done.Outputs["there"]) != `"local then other"` {
		b, _ := json.Marshal(done.Run)
		t.Fatalf("flow = %s, run %s", done.State, b)
	}
	// "there" read "here"'s output as the local node signed it.
	if p := done.Run.Steps["here"].Items[0].Proof; p == nil || p.Node != localNode {
		t.Errorf("here's output proof = %+v, want one by %s", p, localNode)
	}

	// A step task whose input was changed in Redis, or carries none that
	// a node signed, is refused by the other site's runner.
	rdb, err := queue.Connect(f.redis)
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	forge := envelope.NewFlow("forge", "local", time.Now())
	forge.Steps = []envelope.Step{
		{Name: "here", Script: `job := import("job"); job.result("real")`},
		{Name: "there", Script: `job := import("job"); job.result(job.inputs.here)`, DependsOn: []string{"here"}, Site: "other", Retries: 2},
	}
	fenv, _ := forge.Sign(f.admin)
	fraw, _ := json.Marshal(fenv)
	realProof := done.Run.Steps["here"].Items[0].Proof // another job's: it signs that job's ID
	var ids []string
	for attempt, proofs := range []map[string][]*envelope.OutputProof{nil, {"here": {realProof}}} {
		id := envelope.StepJobID(fenv.ID(), "there", 0, attempt+1)
		task, _ := json.Marshal(verify.StepTask{Flow: fraw, Step: "there", Attempt: attempt + 1, Inputs: json.RawMessage(`{"here":"forged"}`), Proofs: proofs})
		if _, err := rdb.Enqueue(ctx, queue.Task{ID: id, Envelope: task, Queue: queue.SiteQueue("other"), MaxRetry: 0, Timeout: time.Minute}); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	testenv.WaitFor(t, 30*time.Second, "the runner to refuse the forged inputs", func() bool {
		evs, err := rdb.ReadEvents(ctx, "other", "0", 10000, 0)
		if err != nil {
			return false
		}
		ended := 0
		for _, ev := range evs {
			if slices.Contains(ids, ev.Job) && ev.Type.Terminal() {
				ended++
				if ev.Type != job.EventFailed || ev.Reason != job.ReasonBadInput {
					t.Errorf("a forged input's step ended %s %s %s", ev.Type, ev.Reason, ev.Error)
				}
			}
		}
		return ended == len(ids)
	})
}

// TestFleet_Cancel: cancelling a running flow stops its running step
// within 2 s and starts nothing else; writ job cancel stops a running job;
// cancelling a flow whose step is held removes the step's task.
func TestFleet_Cancel(t *testing.T) {
	slow(t)
	t.Parallel()
	f := newFleet(t)
	f.startSupervisor("local")
	f.startCoord()
	f.startRunner("n1", 2)
	ctx := context.Background()
	cl := f.client()
	fl := envelope.NewFlow("cancel", "local", time.Now())
	fl.Steps = []envelope.Step{
		{Name: "long", Script: `times := import("times"); times.sleep(60 * times.second)`},
		{Name: "next", Script: `x := 1`, DependsOn: []string{"long"}},
	}
	env, err := fl.Sign(f.admin)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(env)
	rep, err := cl.SubmitFlow(ctx, raw)
	if err != nil {
		t.Fatal(err)
	}
	longID := envelope.StepJobID(rep.ID, "long", 0, 1)
	testenv.WaitFor(t, time.Minute, "the long step to run", func() bool {
		j, err := cl.Job(ctx, longID, 0)
		return err == nil && j.State == "running"
	})
	at := time.Now()
	if _, err := cl.CancelFlow(ctx, rep.ID); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 10*time.Second, "the long step to end", func() bool {
		j, err := cl.Job(ctx, longID, 0)
		return err == nil && j.State.Terminal()
	})
	took := time.Since(at)
	j, _ := cl.Job(ctx, longID, 0)
	if j.State != "failed" || j.Reason != "cancelled" || took > 2*time.Second {
		t.Errorf("the cancelled step = %s %s after %s; want failed, cancelled, within 2 s", j.State, j.Reason, took)
	}
	testenv.WaitFor(t, 10*time.Second, "the flow to end cancelled", func() bool {
		done, err := cl.Flow(ctx, rep.ID)
		return err == nil && done.State == flow.StateCancelled
	})
	time.Sleep(2 * time.Second)
	if _, err := cl.Job(ctx, envelope.StepJobID(rep.ID, "next", 0, 1), 0); err == nil {
		t.Error("a step started after its flow was cancelled")
	}

	// writ job cancel: a running job.
	sign := func(script string) string {
		j := envelope.NewJob("c", script, "local", time.Now())
		e, _ := j.Sign(f.admin)
		b, _ := json.Marshal(e)
		r, err := cl.Submit(ctx, b)
		if err != nil {
			t.Fatal(err)
		}
		return r.ID
	}
	running := sign(`times := import("times"); times.sleep(60 * times.second)`)
	testenv.WaitFor(t, 30*time.Second, "the job to run", func() bool {
		j, err := cl.Job(ctx, running, 0)
		return err == nil && j.State == "running"
	})
	out := f.run("job", "cancel", running, "--coord", f.coord, "--key", filepath.Join(f.dir, "admin.key"))
	if !strings.Contains(out, `"running"`) {
		t.Errorf("writ job cancel of a running job: %s", out)
	}
	// A flow whose step is held (scheduled, not started): its cancel
	// removes the step's task, which ends cancelled.
	held := envelope.NewFlow("held", "local", time.Now())
	held.Steps = []envelope.Step{{Name: "later", Script: `x := 1`, NotBefore: time.Now().Add(time.Hour)}}
	henv, _ := held.Sign(f.admin)
	hraw, _ := json.Marshal(henv)
	hrep, err := cl.SubmitFlow(ctx, hraw)
	if err != nil {
		t.Fatal(err)
	}
	queued := envelope.StepJobID(hrep.ID, "later", 0, 1)
	testenv.WaitFor(t, 30*time.Second, "the held step to be queued", func() bool {
		j, err := cl.Job(ctx, queued, 0)
		return err == nil && j.State == "queued"
	})
	if _, err := cl.CancelFlow(ctx, hrep.ID); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{running, queued} {
		testenv.WaitFor(t, 10*time.Second, "the cancelled job to end", func() bool {
			j, err := cl.Job(ctx, id, 0)
			return err == nil && j.State == "failed" && j.Reason == "cancelled"
		})
	}
}

// checkFlowStream checks a flow's events as WatchFlow gave them: every
// step of items (step → its number of jobs) was last seen ended with
// that many jobs ended, summaries of a step never go back, and the last
// event is the flow's end in state.
func checkFlowStream(t *testing.T, events []coord.FlowStreamEvent, items map[string]int, state string) {
	t.Helper()
	if len(events) == 0 {
		t.Fatal("the flow's stream sent nothing")
	}
	last := events[len(events)-1]
	if last.Flow == nil || last.Flow.State != state {
		t.Errorf("the stream's last event = %+v (flow %+v), want the flow %s", last, last.Flow, state)
	}
	seen := map[string]flow.StepSummary{}
	for _, ev := range events {
		if ev.Step == nil {
			continue
		}
		if old, ok := seen[ev.Step.Step]; ok && ev.Step.Ended < old.Ended {
			t.Errorf("step %s went back: %+v after %+v", ev.Step.Step, *ev.Step, old)
		}
		seen[ev.Step.Step] = *ev.Step
	}
	for step, n := range items {
		s, ok := seen[step]
		if !ok || s.State != flow.StateSucceeded || s.Items != n || s.Ended != n || s.Start.IsZero() || s.End.Before(s.Start) {
			t.Errorf("step %s last seen as %+v, want succeeded with %d jobs ended", step, s, n)
		}
	}
	if len(seen) != len(items) {
		t.Errorf("the stream named steps %v, want %v", seen, items)
	}
}

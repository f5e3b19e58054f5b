package flow

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
)

// job is what a simulated job does: its result, or an error.
type job func(st Start) (json.RawMessage, error)

// simulate drives r to its end, running the started jobs one at a time in
// start order (a JSON round trip of r between each, as coord keeps it),
// and returns every job started.
func simulate(t *testing.T, f *envelope.Flow, r *Run, now time.Time, run job) (*Run, []Start) {
	t.Helper()
	var queue, all []Start
	for i := 0; i < 10000; i++ {
		if len(queue) == 0 {
			starts, _ := r.Next(f, now)
			if len(starts) == 0 {
				if !r.Done() {
					t.Fatalf("flow stuck in %s: %+v", r.State, r.Steps)
				}
				return r, all
			}
			queue = append(queue, starts...)
			all = append(all, starts...)
			continue
		}
		st := queue[0]
		queue = queue[1:]
		out, err := run(st)
		msg := ""
		if err != nil {
			msg = err.Error()
		}
		if again := r.Ended(f, st.Step, st.Item, st.Attempt, err == nil, out, nil, msg, now); again != nil {
			queue = append(queue, *again)
			all = append(all, *again)
		}
		b, _ := json.Marshal(r)
		r = &Run{}
		if err := json.Unmarshal(b, r); err != nil {
			t.Fatal(err)
		}
	}
	t.Fatal("the flow did not end")
	return nil, nil
}

func newTestFlow(steps ...envelope.Step) *envelope.Flow {
	f := envelope.NewFlow("t", "lab", time.Now())
	for i := range steps {
		if steps[i].Script == "" {
			steps[i].Script = "x := 1"
		}
	}
	f.Steps = steps
	return f
}

func list(v ...any) json.RawMessage { b, _ := json.Marshal(v); return b }

func TestRun_FanOutFanIn(t *testing.T) {
	f := newTestFlow(
		envelope.Step{Name: "fetch"},
		envelope.Step{Name: "each", DependsOn: []string{"fetch"}, ForEach: json.RawMessage(`"fetch"`)},
		envelope.Step{Name: "combine", DependsOn: []string{"each"}},
	)
	if err := f.Validate(); err != nil {
		t.Fatal(err)
	}
	r, all := simulate(t, f, NewRun(f), time.Now(), func(st Start) (json.RawMessage, error) {
		switch st.Step {
		case "fetch":
			return list("a", "b", "c"), nil
		case "each":
			var v string
			json.Unmarshal(st.Value, &v)
			return json.Marshal(v + "!")
		default:
			var in struct{ Each []string }
			json.Unmarshal(st.Inputs, &in)
			return json.Marshal(strings.Join(in.Each, "+"))
		}
	})
	if r.State != StateSucceeded || len(all) != 5 {
		t.Fatalf("flow %s after %d jobs: %+v", r.State, len(all), r.Steps)
	}
	if got := string(r.Outputs()["combine"]); got != `"a!+b!+c!"` {
		t.Errorf("fan-in output = %s", got)
	}
	if got := string(r.Steps["each"].Out); got != `["a!","b!","c!"]` {
		t.Errorf("fan-out output = %s", got)
	}
}

func TestRun_FailureSkipsAndFinally(t *testing.T) {
	f := newTestFlow(
		envelope.Step{Name: "bad"},
		envelope.Step{Name: "slow"},
		envelope.Step{Name: "after_bad", DependsOn: []string{"bad"}},
		envelope.Step{Name: "after_slow", DependsOn: []string{"slow"}},
	)
	f.Finally = &envelope.Step{Name: "report", Script: "x := 1"}
	var finallyIn json.RawMessage
	r, all := simulate(t, f, NewRun(f), time.Now(), func(st Start) (json.RawMessage, error) {
		switch st.Step {
		case "bad":
			return nil, fmt.Errorf("boom")
		case "report":
			finallyIn = st.Inputs
		}
		return list(1), nil
	})
	if r.State != StateFailed || len(r.Failed) != 1 || r.Failed[0] != "bad" {
		t.Fatalf("flow = %s, failed %v", r.State, r.Failed)
	}
	want := map[string]string{"bad": StateFailed, "slow": StateSucceeded, "after_bad": StateSkipped, "after_slow": StateSkipped}
	for name, state := range want {
		if got := r.Steps[name].State; got != state {
			t.Errorf("step %s = %s, want %s", name, got, state)
		}
	}
	if r.Steps["bad"].Error != "boom" || r.Finally.State != StateSucceeded {
		t.Errorf("bad's error %q, finally %s", r.Steps["bad"].Error, r.Finally.State)
	}
	var in struct {
		Flow struct {
			State  string
			Failed []string
			Steps  map[string]string
		}
	}
	json.Unmarshal(finallyIn, &in)
	if in.Flow.State != StateFailed || len(in.Flow.Failed) != 1 || in.Flow.Steps["after_bad"] != StateSkipped {
		t.Errorf("finally read %s", finallyIn)
	}
	for _, st := range all {
		if strings.HasPrefix(st.Step, "after_") {
			t.Errorf("%s started after the flow failed", st.Step)
		}
	}
}

func TestRun_RetryAndContinue(t *testing.T) {
	f := newTestFlow(
		envelope.Step{Name: "flaky", Retries: 2},
		envelope.Step{Name: "optional", ContinueOnFailure: true},
		envelope.Step{Name: "last", DependsOn: []string{"flaky", "optional"}},
	)
	tries := 0
	var lastIn json.RawMessage
	r, _ := simulate(t, f, NewRun(f), time.Now(), func(st Start) (json.RawMessage, error) {
		switch st.Step {
		case "flaky":
			tries++
			if st.Attempt != tries {
				t.Errorf("attempt %d, want %d", st.Attempt, tries)
			}
			if tries == 1 {
				return nil, fmt.Errorf("once")
			}
		case "optional":
			return nil, fmt.Errorf("does not matter")
		case "last":
			lastIn = st.Inputs
		}
		return json.Marshal(st.Step)
	})
	if r.State != StateSucceeded || tries != 2 || r.Steps["flaky"].Items[0].Attempts != 2 || r.Steps["optional"].State != StateFailed {
		t.Fatalf("flow %s, %d tries, steps %+v", r.State, tries, r.Steps)
	}
	if string(lastIn) != `{"flaky":"flaky","optional":null}` {
		t.Errorf("last read %s", lastIn)
	}
	// Retries run out: the step fails.
	f2 := newTestFlow(envelope.Step{Name: "never", Retries: 1})
	r2, all := simulate(t, f2, NewRun(f2), time.Now(), func(Start) (json.RawMessage, error) { return nil, fmt.Errorf("no") })
	if r2.State != StateFailed || len(all) != 2 {
		t.Errorf("a step that always fails: flow %s after %d jobs", r2.State, len(all))
	}
}

func TestRun_Cancel(t *testing.T) {
	f := newTestFlow(envelope.Step{Name: "long"}, envelope.Step{Name: "next", DependsOn: []string{"long"}})
	f.Finally = &envelope.Step{Name: "report", Script: "x := 1"}
	r := NewRun(f)
	now := time.Now()
	starts, _ := r.Next(f, now)
	if len(starts) != 1 || starts[0].Step != "long" {
		t.Fatalf("starts = %+v", starts)
	}
	r.Cancel(now)
	if running := r.Running(f); len(running) != 1 || running[0].Step != "long" {
		t.Errorf("running after cancel = %+v", running)
	}
	if more, _ := r.Next(f, now); len(more) != 0 {
		t.Errorf("started after cancel: %+v", more)
	}
	r.Ended(f, "long", 0, 1, false, nil, nil, "context canceled", now)
	if more, _ := r.Next(f, now); len(more) != 0 || r.State != StateCancelled || r.Steps["long"].State != StateCancelled || r.Steps["next"].State != StateCancelled || r.Finally.State != StateCancelled {
		t.Errorf("after the cancelled job ended: %s %+v, finally %+v, started %+v", r.State, r.Steps, r.Finally, more)
	}
	// A late success of a cancelled job, and a second report, change nothing.
	if r.Ended(f, "long", 0, 1, true, list(1), nil, "", now); r.Steps["long"].State != StateCancelled {
		t.Errorf("a late report revived the step: %+v", r.Steps["long"])
	}
}

func TestRun_DuplicateEndIgnored(t *testing.T) {
	f := newTestFlow(envelope.Step{Name: "a"}, envelope.Step{Name: "b", DependsOn: []string{"a"}})
	r := NewRun(f)
	now := time.Now()
	r.Next(f, now)
	r.Ended(f, "a", 0, 1, true, list(1), nil, "", now)
	starts, _ := r.Next(f, now)
	if len(starts) != 1 || starts[0].Step != "b" {
		t.Fatalf("starts = %+v", starts)
	}
	// a's completion delivered again (a redelivered event) after b started.
	if again := r.Ended(f, "a", 0, 1, false, nil, nil, "late failure", now); again != nil || r.Steps["a"].State != StateSucceeded {
		t.Errorf("a second end of a changed it: %+v", r.Steps["a"])
	}
	if more, _ := r.Next(f, now); len(more) != 0 {
		t.Errorf("b started twice: %+v", more)
	}
	// Reports for steps or items that do not exist.
	r.Ended(f, "nope", 0, 1, true, nil, nil, "", now)
	r.Ended(f, "b", 7, 1, true, nil, nil, "", now)
	r.Ended(f, "b", -1, 1, true, nil, nil, "", now)
	r.Ended(f, "b", 0, 2, true, nil, nil, "", now) // a run that never started
	if r.Steps["b"].State != StateRunning {
		t.Errorf("b = %+v", r.Steps["b"])
	}
}

func TestRun_HoldsAndBounds(t *testing.T) {
	now := time.Now()
	f := newTestFlow(envelope.Step{Name: "a", NotBefore: now.Add(time.Hour)})
	f.NotBefore = now.Add(time.Minute)
	r := NewRun(f)
	if starts, wake := r.Next(f, now); len(starts) != 0 || !wake.Equal(f.NotBefore) {
		t.Errorf("before the flow's not_before: %+v, wake %s", starts, wake)
	}
	starts, _ := r.Next(f, now.Add(2*time.Minute))
	if len(starts) != 1 || !starts[0].NotBefore.Equal(f.Steps[0].NotBefore) {
		t.Errorf("the held step's start = %+v", starts)
	}

	// A fan-out over an output that is not a list fails the step.
	f2 := newTestFlow(envelope.Step{Name: "src"}, envelope.Step{Name: "each", DependsOn: []string{"src"}, ForEach: json.RawMessage(`"src"`)})
	r2, _ := simulate(t, f2, NewRun(f2), now, func(Start) (json.RawMessage, error) { return json.RawMessage(`{"not":"a list"}`), nil })
	if r2.State != StateFailed || !strings.Contains(r2.Steps["each"].Error, "the output of src is not a list") {
		t.Errorf("fan-out over an object: %s, %+v", r2.State, r2.Steps["each"])
	}
	// A fan-out over nothing succeeds at once, with an empty list.
	f3 := newTestFlow(envelope.Step{Name: "each", ForEach: json.RawMessage(`[]`)}, envelope.Step{Name: "after", DependsOn: []string{"each"}})
	var in json.RawMessage
	r3, _ := simulate(t, f3, NewRun(f3), now, func(st Start) (json.RawMessage, error) { in = st.Inputs; return nil, nil })
	if r3.State != StateSucceeded || string(in) != `{"each":[]}` {
		t.Errorf("fan-out over nothing: %s, after read %s", r3.State, in)
	}
	// Inputs past the limit fail the step that would read them.
	f4 := newTestFlow(envelope.Step{Name: "big"}, envelope.Step{Name: "reader", DependsOn: []string{"big"}})
	big, _ := json.Marshal(strings.Repeat("x", MaxInputBytes))
	r4, _ := simulate(t, f4, NewRun(f4), now, func(Start) (json.RawMessage, error) { return big, nil })
	if r4.State != StateFailed || !strings.Contains(r4.Steps["reader"].Error, "inputs are") {
		t.Errorf("huge inputs: %s, %+v", r4.State, r4.Steps["reader"].Error)
	}
	// An expired flow starts nothing and fails.
	f5 := newTestFlow(envelope.Step{Name: "a"})
	r5 := NewRun(f5)
	if starts, _ := r5.Next(f5, f5.Expires.Add(time.Second)); len(starts) != 0 || r5.State != StateFailed || !strings.Contains(r5.Error, "expired") {
		t.Errorf("expired flow: %+v, %s %q", starts, r5.State, r5.Error)
	}
}

func TestRun_Summary(t *testing.T) {
	f := newTestFlow(
		envelope.Step{Name: "fetch"},
		envelope.Step{Name: "each", DependsOn: []string{"fetch"}, ForEach: json.RawMessage(`[1,2,3]`), Retries: 1},
	)
	f.Finally = &envelope.Step{Name: "report", Script: "x := 1"}
	if err := f.Validate(); err != nil {
		t.Fatal(err)
	}
	r := NewRun(f)
	now := time.Now()
	r.Next(f, now)
	r.Ended(f, "fetch", 0, 1, true, list(1), nil, "", now)
	r.Next(f, now)
	r.Ended(f, "each", 0, 1, true, nil, nil, "", now)
	r.Ended(f, "each", 1, 1, false, nil, nil, strings.Repeat("x", 5000), now) // retried
	got := r.Summary(f)
	if len(got) != 3 || got[0].Step != "fetch" || got[1].Step != "each" || got[2].Step != "report" || !got[2].Finally {
		t.Fatalf("summary = %+v", got)
	}
	if s := got[0]; s.State != StateSucceeded || s.Items != 1 || s.Ended != 1 || s.Runs != 1 {
		t.Errorf("fetch = %+v", s)
	}
	if s := got[1]; s.State != StateRunning || s.Items != 3 || s.Ended != 1 || s.Runs != 4 {
		t.Errorf("each = %+v", s)
	}
	if s := got[2]; s.State != StatePending || s.Items != 0 {
		t.Errorf("report = %+v", s)
	}
	// A long error is cut.
	r.Ended(f, "each", 1, 2, false, nil, nil, strings.Repeat("y", 5000), now)
	r.Ended(f, "each", 2, 1, true, nil, nil, "", now)
	if s := r.Summary(f)[1]; s.State != StateFailed || len(s.Error) > MaxSummaryError+len("…") {
		t.Errorf("each after its failure = %s, error of %d bytes", s.State, len(s.Error))
	}
}

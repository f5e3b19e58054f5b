package flow

import (
	"encoding/json"
	"fmt"
	"sort"
	"time"

	"github.com/writ-fleet/writ/envelope"
)

// States of a flow, a step and a step's item.
const (
	StatePending   = "pending"   // waiting on its dependencies (or its not_before)
	StateRunning   = "running"   // a job was started (it may be held until its not_before)
	StateSucceeded = "succeeded" //
	StateFailed    = "failed"    //
	StateSkipped   = "skipped"   // a dependency failed, or the flow failed before it could start
	StateCancelled = "cancelled" //
	// A flow's states between running and its end.
	StateFailing   = "failing"   // a step failed: running steps finish, nothing new starts, then finally
	StateFinishing = "finishing" // every step ended: finally runs
)

// MaxInputBytes bounds what one step reads as job.inputs: a fan-in over a
// thousand outputs of a megabyte each must fail clearly, not take a coord's
// memory or a runner's.
const MaxInputBytes = 1 << 20

// Run is a flow's progress: what coord keeps for it (as JSON) and updates
// as its jobs end. It is a pure state machine: Next says what to start,
// Ended records how a run of a job went, Cancel stops it; none of them does
// any I/O, so the same events always give the same flow.
type Run struct {
	State   string              `json:"state"`
	Steps   map[string]*StepRun `json:"steps"`
	Finally *StepRun            `json:"finally,omitempty"`
	// Failed names the steps whose failure failed the flow.
	Failed []string `json:"failed,omitempty"`
	// Error says why the flow failed when no step did (it expired).
	Error string `json:"error,omitempty"`
}

// StepRun is one step's progress; a fan-out has one item per element.
type StepRun struct {
	State string          `json:"state"`
	Items []Item          `json:"items,omitempty"`
	Error string          `json:"error,omitempty"`
	Start time.Time       `json:"started_at,omitzero"`
	End   time.Time       `json:"ended_at,omitzero"`
	Out   json.RawMessage `json:"output,omitempty"`
}

// Item is one job of a step.
type Item struct {
	State    string          `json:"state"`
	Value    json.RawMessage `json:"value,omitempty"` // the for_each element
	Attempts int             `json:"attempts"`
	Output   json.RawMessage `json:"output,omitempty"`
	// Proof is the signature of the node that made Output, if it signed.
	Proof *envelope.OutputProof `json:"proof,omitempty"`
	Error string                `json:"error,omitempty"`
}

// Start is a job to start: item Item of step Step, with what it reads.
type Start struct {
	Step   string
	Item   int
	Value  json.RawMessage // job.item, for a fan-out
	Inputs json.RawMessage // job.inputs: the outputs of the steps it depends on (finally: the flow's outcome as "flow")
	// Proofs are the nodes' signatures over Inputs: for each step it
	// depends on, one per item (null where an item's node did not sign).
	Proofs map[string][]*envelope.OutputProof
	// NotBefore holds the job until then (asynq's ProcessAt).
	NotBefore time.Time
	// Attempt counts from 1.
	Attempt int
}

// NewRun returns the progress of a flow that has not started.
func NewRun(f *envelope.Flow) *Run {
	r := &Run{State: StateRunning, Steps: make(map[string]*StepRun, len(f.Steps))}
	for _, s := range f.Steps {
		r.Steps[s.Name] = &StepRun{State: StatePending}
	}
	if f.Finally != nil {
		r.Finally = &StepRun{State: StatePending}
	}
	return r
}

// Done reports whether the flow has ended.
func (r *Run) Done() bool { return Ended(r.State) }

// Ended reports whether a flow in state has ended.
func Ended(state string) bool {
	return state == StateSucceeded || state == StateFailed || state == StateCancelled
}

// Next marks the jobs that may start now as running and returns them: the
// items of every step whose dependencies allow it, once the flow's own
// not_before has passed; and, once nothing else runs or can, finally. When
// there is nothing to start, wake is when there may be (the flow's
// not_before), or zero.
func (r *Run) Next(f *envelope.Flow, now time.Time) (starts []Start, wake time.Time) {
	if r.Done() {
		return nil, time.Time{}
	}
	if now.Before(f.NotBefore) {
		return nil, f.NotBefore
	}
	order, _ := f.Order()
	stopping := r.State != StateRunning // failing or cancelling: start nothing new
	if !stopping && !now.Before(f.Expires) {
		r.State, r.Error = StateFailing, fmt.Sprintf("the flow expired at %s with steps not started", f.Expires.UTC().Format(time.RFC3339))
		stopping = true
	}
	for _, s := range order {
		sr := r.Steps[s.Name]
		if sr.State != StatePending {
			continue
		}
		ready, skip := r.deps(f, s)
		switch {
		case skip:
			sr.State, sr.End = StateSkipped, now
			continue
		case !ready || stopping:
			continue
		}
		st, err := r.start(f, s, sr, now)
		if err != nil {
			r.fail(s.Name, sr, err.Error(), now, s.ContinueOnFailure)
			stopping = r.State != StateRunning
			continue
		}
		starts = append(starts, st...)
	}
	if len(starts) > 0 || r.running() {
		return starts, time.Time{}
	}
	// Nothing runs, nothing more can start: what is left pending is skipped.
	for _, s := range order {
		if sr := r.Steps[s.Name]; sr.State == StatePending {
			sr.State, sr.End = StateSkipped, now
		}
	}
	if r.State == StateRunning {
		r.State = StateFinishing
	}
	if r.Finally != nil && r.Finally.State == StatePending && r.State != StateCancelled {
		outcome := StateSucceeded
		if len(r.Failed) > 0 || r.Error != "" {
			outcome = StateFailed
		}
		in := map[string]any{"flow": r.outcome(outcome)}
		inputs, _ := json.Marshal(in)
		r.Finally.State, r.Finally.Start = StateRunning, now
		r.Finally.Items = []Item{{State: StateRunning, Attempts: 1}}
		return []Start{{Step: f.Finally.Name, Inputs: inputs, NotBefore: f.Finally.NotBefore, Attempt: 1}}, time.Time{}
	}
	if r.Finally == nil || r.Finally.State != StateRunning {
		r.end()
	}
	return nil, time.Time{}
}

// deps says whether step s may start (every dependency succeeded, or
// ended and continues on failure) or must be skipped (one failed without
// continue_on_failure, or was skipped or cancelled).
func (r *Run) deps(f *envelope.Flow, s *envelope.Step) (ready, skip bool) {
	ready = true
	for _, d := range s.DependsOn {
		dr := r.Steps[d]
		switch dr.State {
		case StateSucceeded:
		case StateFailed:
			if !f.Step(d).ContinueOnFailure {
				return false, true
			}
		case StateSkipped, StateCancelled:
			return false, true
		default:
			ready = false
		}
	}
	return ready, false
}

// start resolves step s's items and inputs and marks it running.
func (r *Run) start(f *envelope.Flow, s *envelope.Step, sr *StepRun, now time.Time) ([]Start, error) {
	inputs, proofs, size := r.inputs(s)
	if size > MaxInputBytes {
		return nil, fmt.Errorf("its inputs are %d bytes, the limit is %d", size, MaxInputBytes)
	}
	values := []json.RawMessage{nil}
	if len(s.ForEach) > 0 {
		var src json.RawMessage
		switch {
		case isName(s.ForEachStep):
			name, _ := s.ForEachStep()
			src = r.Steps[name].Out
		case isName(s.ForEachArg):
			name, _ := s.ForEachArg()
			var args map[string]json.RawMessage
			_ = json.Unmarshal(f.Args, &args)
			src = args[name]
		default:
			src = s.ForEach
		}
		values = nil
		if err := json.Unmarshal(src, &values); err != nil || values == nil {
			return nil, fmt.Errorf("for_each: %s is not a list", forEachWhat(s))
		}
		if len(values) > envelope.MaxForEachItems {
			return nil, fmt.Errorf("for_each: %d items, the limit is %d", len(values), envelope.MaxForEachItems)
		}
	}
	sr.State, sr.Start = StateRunning, now
	sr.Items = make([]Item, len(values))
	if len(values) == 0 {
		// A fan-out over nothing has nothing to do.
		sr.State, sr.End, sr.Out = StateSucceeded, now, json.RawMessage("[]")
		return nil, nil
	}
	starts := make([]Start, len(values))
	for i, v := range values {
		sr.Items[i] = Item{State: StateRunning, Value: v, Attempts: 1}
		starts[i] = Start{Step: s.Name, Item: i, Value: v, Inputs: inputs, Proofs: proofs, NotBefore: s.NotBefore, Attempt: 1}
	}
	return starts, nil
}

// Ended records how run attempt (from 1; 0: the current one) of item item
// of step ended: ok with output, or failed with errMsg. A failed run of a
// step with retries left is started again: Ended returns it. A report for
// an item not running, or for another run of it than the current one (a
// repeat, a late end of a run already retried), changes nothing.
func (r *Run) Ended(f *envelope.Flow, step string, item, attempt int, ok bool, output json.RawMessage, proof *envelope.OutputProof, errMsg string, now time.Time) (again *Start) {
	s := f.Step(step)
	sr := r.Steps[step]
	if f.Finally != nil && step == f.Finally.Name {
		sr = r.Finally
	}
	if s == nil || sr == nil || item < 0 || item >= len(sr.Items) || sr.Items[item].State != StateRunning ||
		(attempt != 0 && attempt != sr.Items[item].Attempts) {
		return nil
	}
	it := &sr.Items[item]
	switch {
	case ok:
		it.State, it.Output, it.Proof, it.Error = StateSucceeded, output, proof, ""
	case r.State == StateCancelled:
		it.State, it.Error = StateCancelled, errMsg
	case it.Attempts <= s.Retries:
		// A running step is let finish, its retries included, also once
		// another step failed the flow (not once it was cancelled).
		it.Attempts++
		it.Error = errMsg
		st := &Start{Step: step, Item: item, Value: it.Value, Attempt: it.Attempts}
		st.Inputs, st.Proofs = r.InputsOf(f, s)
		return st
	default:
		it.State, it.Error = StateFailed, errMsg
	}
	// The step ends when its last item does.
	for _, x := range sr.Items {
		if x.State == StateRunning {
			return nil
		}
	}
	sr.End = now
	var failed []string
	outs := make([]json.RawMessage, len(sr.Items))
	for i, x := range sr.Items {
		outs[i] = x.Output
		if len(outs[i]) == 0 {
			outs[i] = json.RawMessage("null")
		}
		if x.State != StateSucceeded {
			failed = append(failed, fmt.Sprintf("item %d: %s", i, x.Error))
		}
	}
	switch {
	case len(s.ForEach) > 0:
		sr.Out, _ = json.Marshal(outs)
	default:
		sr.Out = sr.Items[0].Output
	}
	switch {
	case sr == r.Finally && r.State == StateCancelled:
		sr.State = StateCancelled
		r.end()
	case sr == r.Finally:
		sr.State = StateSucceeded
		if len(failed) > 0 {
			sr.State, sr.Error = StateFailed, sr.Items[0].Error
			r.Failed = append(r.Failed, step)
		}
		r.end()
	case r.State == StateCancelled && len(failed) > 0:
		sr.State = StateCancelled
	case len(failed) > 0:
		msg := failed[0]
		if len(s.ForEach) == 0 {
			msg = sr.Items[0].Error
		}
		r.fail(step, sr, msg, now, s.ContinueOnFailure)
	default:
		sr.State = StateSucceeded
	}
	return nil
}

// Cancel stops the flow: nothing more starts, finally included; the
// caller cancels the jobs that run (Running). Cancelling an ended flow
// changes nothing.
func (r *Run) Cancel(now time.Time) {
	if r.Done() {
		return
	}
	r.State = StateCancelled
	for _, sr := range r.Steps {
		if sr.State == StatePending {
			sr.State, sr.End = StateCancelled, now
		}
	}
	if r.Finally != nil && r.Finally.State == StatePending {
		r.Finally.State = StateCancelled
	}
}

// Running lists the jobs that run now, as (step, item).
func (r *Run) Running(f *envelope.Flow) []Start {
	var out []Start
	add := func(name string, sr *StepRun) {
		for i, it := range sr.Items {
			if it.State == StateRunning {
				out = append(out, Start{Step: name, Item: i, Attempt: it.Attempts})
			}
		}
	}
	for name, sr := range r.Steps {
		add(name, sr)
	}
	if r.Finally != nil {
		add(f.Finally.Name, r.Finally)
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].Step < out[j].Step || out[i].Step == out[j].Step && out[i].Item < out[j].Item
	})
	return out
}

// Outputs are the outputs of the steps that succeeded, keyed by name.
func (r *Run) Outputs() map[string]json.RawMessage {
	out := map[string]json.RawMessage{}
	for name, sr := range r.Steps {
		if sr.State == StateSucceeded {
			out[name] = sr.Out
		}
	}
	return out
}

func (r *Run) fail(name string, sr *StepRun, msg string, now time.Time, continues bool) {
	sr.State, sr.Error, sr.End = StateFailed, msg, now
	if continues {
		return
	}
	r.Failed = append(r.Failed, name)
	if r.State == StateRunning {
		r.State = StateFailing // running steps finish; nothing new starts
	}
}

// end sets the flow's final state once nothing runs.
func (r *Run) end() {
	switch {
	case r.State == StateCancelled:
	case len(r.Failed) > 0 || r.Error != "":
		r.State = StateFailed
	default:
		r.State = StateSucceeded
	}
}

func (r *Run) running() bool {
	for _, sr := range r.Steps {
		if sr.State == StateRunning {
			return true
		}
	}
	return false
}

// outcome is what finally reads as job.inputs.flow.
func (r *Run) outcome(state string) map[string]any {
	steps := map[string]string{}
	for name, sr := range r.Steps {
		steps[name] = sr.State
	}
	o := map[string]any{"state": state, "steps": steps, "failed": append([]string{}, r.Failed...)}
	if r.Error != "" {
		o["error"] = r.Error
	}
	return o
}

// InputsOf is what step s reads as job.inputs now, and the proofs of
// those outputs.
func (r *Run) InputsOf(f *envelope.Flow, s *envelope.Step) (inputs json.RawMessage, proofs map[string][]*envelope.OutputProof) {
	if f.Finally != nil && s.Name == f.Finally.Name {
		state := StateSucceeded
		if len(r.Failed) > 0 || r.Error != "" {
			state = StateFailed
		}
		b, _ := json.Marshal(map[string]any{"flow": r.outcome(state)})
		return b, nil
	}
	inputs, proofs, _ = r.inputs(s)
	return inputs, proofs
}

// inputs is what step s reads as job.inputs (nil when it depends on no
// step), the proofs of those outputs (nil when no node signed one), and
// their size.
func (r *Run) inputs(s *envelope.Step) (inputs json.RawMessage, proofs map[string][]*envelope.OutputProof, size int) {
	if len(s.DependsOn) == 0 {
		return nil, nil, 0
	}
	in := make(map[string]json.RawMessage, len(s.DependsOn))
	signed := make(map[string][]*envelope.OutputProof, len(s.DependsOn))
	some := false
	for _, d := range s.DependsOn {
		dr := r.Steps[d]
		out := dr.Out
		if len(out) == 0 {
			out = json.RawMessage("null")
		}
		in[d] = out
		size += len(out)
		ps := make([]*envelope.OutputProof, len(dr.Items))
		for i := range dr.Items {
			ps[i] = dr.Items[i].Proof
			some = some || ps[i] != nil
		}
		signed[d] = ps
	}
	inputs, _ = json.Marshal(in)
	if !some {
		signed = nil
	}
	return inputs, signed, size
}

func isName(fn func() (string, bool)) bool { _, ok := fn(); return ok }

func forEachWhat(s *envelope.Step) string {
	if name, ok := s.ForEachStep(); ok {
		return "the output of " + name
	}
	if name, ok := s.ForEachArg(); ok {
		return "args." + name
	}
	return "the list"
}

// StepSummary is one step's progress in brief: what a flow's event stream
// sends when it changes.
type StepSummary struct {
	Step    string    `json:"step"`
	Finally bool      `json:"finally,omitempty"`
	State   string    `json:"state"`
	Items   int       `json:"items"`           // jobs of the step (a fan-out's elements)
	Ended   int       `json:"ended"`           // of those, how many ended
	Runs    int       `json:"runs"`            // runs started, retries included
	Error   string    `json:"error,omitempty"` // at most MaxSummaryError bytes
	Start   time.Time `json:"started_at,omitzero"`
	End     time.Time `json:"ended_at,omitzero"`
}

// MaxSummaryError bounds the error a StepSummary carries.
const MaxSummaryError = 1024

// Summary is every step's StepSummary, in the flow's order, finally last.
func (r *Run) Summary(f *envelope.Flow) []StepSummary {
	order, _ := f.Order()
	out := make([]StepSummary, 0, len(order)+1)
	add := func(name string, sr *StepRun, finally bool) {
		if sr == nil {
			return
		}
		s := StepSummary{Step: name, Finally: finally, State: sr.State, Items: len(sr.Items), Error: sr.Error, Start: sr.Start, End: sr.End}
		for _, it := range sr.Items {
			s.Runs += it.Attempts
			if it.State != StateRunning {
				s.Ended++
			}
		}
		if len(s.Error) > MaxSummaryError {
			s.Error = s.Error[:MaxSummaryError] + "…"
		}
		out = append(out, s)
	}
	for _, s := range order {
		add(s.Name, r.Steps[s.Name], false)
	}
	if f.Finally != nil {
		add(f.Finally.Name, r.Finally, true)
	}
	return out
}

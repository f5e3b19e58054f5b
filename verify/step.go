package verify

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/writ-fleet/writ/envelope"
)

// StepTask carries one job of a flow to the runner that executes it: the
// flow's envelope as its users signed it, which of its jobs to run, and
// what the step reads. Only Flow is signed; Step and Item are checked
// against it, and Value too when the signed flow holds the list.
type StepTask struct {
	Flow json.RawMessage `json:"flow"`
	Step string          `json:"step"`
	Item int             `json:"item"`
	// Attempt counts the step's runs from 1: a step may have its retries
	// + 1, each its own job.
	Attempt int             `json:"attempt"`
	Value   json.RawMessage `json:"value,omitempty"`
	// Inputs are the outputs of the steps this one depends on, as coord
	// gathered them. The flow says which steps the inputs come from (a
	// step reads only what it depends on), not what they hold: outputs
	// are not yet signed by the nodes that made them (issue 16).
	Inputs json.RawMessage `json:"inputs,omitempty"`
}

// ParseStepTask reads raw as a step task, if it is one (a JSON object with
// a "flow" member and no "payloadType": not a job envelope). ok is false
// for anything else; err is set for a step task that is malformed.
func ParseStepTask(raw []byte) (task *StepTask, ok bool, err error) {
	var probe struct {
		Flow        json.RawMessage `json:"flow"`
		PayloadType *string         `json:"payloadType"`
	}
	if json.Unmarshal(raw, &probe) != nil || len(probe.Flow) == 0 || probe.PayloadType != nil {
		return nil, false, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	task = &StepTask{}
	if err := dec.Decode(task); err != nil {
		return nil, true, envelope.Refuse(envelope.ReasonMalformed, "step task: "+err.Error())
	}
	return task, true, nil
}

// Step is one step of a checked flow.
type Step struct {
	FlowID  string
	Flow    *envelope.Flow
	Name    string
	Item    int
	Attempt int
	Value   json.RawMessage
	Inputs  json.RawMessage
}

// StepJob checks a step task like Job checks a job, and more: the flow's
// signatures against the policy of the step's site, the step's place in
// the flow (it exists, it is this site's and, if pinned, this node's; the
// item is one of its fan-out's; the carrier's job ID is the one derived
// for it, so two carriers cannot run one step twice under two IDs), and
// the flow's window (no step starts after the flow expires). The Checked
// it returns holds the step as a job (script, args, timeout, resources
// from the signed flow) and the step itself.
func StepJob(ctx context.Context, trust TrustSource, task *StepTask, t Target, now time.Time) (*Checked, *Step, error) {
	env, err := envelope.Decode(task.Flow)
	if err != nil {
		return nil, nil, err
	}
	fl, err := env.Flow()
	if err != nil {
		return nil, nil, err
	}
	if len(env.Signatures) == 0 {
		return nil, nil, envelope.Refuse(envelope.ReasonNoSignature, "flow envelope carries no signatures")
	}
	flowID := env.ID()
	s := fl.Step(task.Step)
	if s == nil {
		return nil, nil, envelope.Refuse(envelope.ReasonInvalidJob, fmt.Sprintf("flow %s has no step %q", flowID, task.Step))
	}
	if task.Attempt < 1 || task.Attempt > s.Retries+1 {
		return nil, nil, envelope.Refuse(envelope.ReasonInvalidJob, fmt.Sprintf("step %s may run %d times (retries %d), not a run number %d", s.Name, s.Retries+1, s.Retries, task.Attempt))
	}
	id := envelope.StepJobID(flowID, s.Name, task.Item, task.Attempt)
	if t.ID != "" && t.ID != id {
		return nil, nil, envelope.Refuse(envelope.ReasonIDMismatch, fmt.Sprintf("the carrier says job %s but step %s item %d run %d of flow %s is job %s: it was altered or swapped in transit", t.ID, s.Name, task.Item, task.Attempt, flowID, id))
	}
	if err := checkItem(fl, s, task); err != nil {
		return nil, nil, err
	}
	site := fl.SiteOf(s)
	if site != t.Site {
		return nil, nil, envelope.Refuse(envelope.ReasonWrongSite, fmt.Sprintf("step %s is for site %q, not %q", s.Name, site, t.Site))
	}
	if t.Node != "" && s.Node != "" && s.Node != t.Node {
		return nil, nil, envelope.Refuse(envelope.ReasonWrongNode, fmt.Sprintf("step %s is pinned to node %q, not %q", s.Name, s.Node, t.Node))
	}
	if err := fl.CheckTime(now); err != nil {
		return nil, nil, err
	}
	if len(task.Inputs) > 0 {
		var in map[string]json.RawMessage
		if err := json.Unmarshal(task.Inputs, &in); err != nil || in == nil {
			return nil, nil, envelope.Refuse(envelope.ReasonMalformed, "step inputs must be a JSON object")
		}
		deps := map[string]bool{}
		for _, d := range s.DependsOn {
			deps[d] = true
		}
		for name := range in {
			if !deps[name] && !(s == fl.Finally && name == "flow") {
				return nil, nil, envelope.Refuse(envelope.ReasonInvalidJob, fmt.Sprintf("step %s was given the input %q, but it depends on no such step", s.Name, name))
			}
		}
	}
	name := fl.Name + "/" + s.Name
	if len(s.ForEach) > 0 {
		name = fmt.Sprintf("%s[%d]", name, task.Item)
	}
	if len(name) > envelope.MaxNameLen {
		name = name[:envelope.MaxNameLen]
	}
	args, err := stepArgs(fl.Args, s.Args)
	if err != nil {
		return nil, nil, err
	}
	spec := &envelope.Job{Name: name, Script: s.Script, Site: site, Node: s.Node, Args: args, NotBefore: fl.SignedAt, Expires: fl.Expires,
		Nonce: fl.Nonce, Timeout: s.Timeout, MaxRetries: envelope.DefaultMaxRetries, Resources: s.Resources}
	keyIDs := make([]string, len(env.Signatures))
	for i, sig := range env.Signatures {
		keyIDs[i] = sig.KeyID
	}
	c, err := authorize(ctx, trust, env, spec, t.Site, keyIDs)
	if err != nil {
		return nil, nil, err
	}
	c.ID = id
	return c, &Step{FlowID: flowID, Flow: fl, Name: s.Name, Item: task.Item, Attempt: task.Attempt, Value: task.Value, Inputs: task.Inputs}, nil
}

// checkItem: the item is one of the step's, and its value the signed one
// where the flow holds the list.
func checkItem(fl *envelope.Flow, s *envelope.Step, task *StepTask) error {
	if len(s.ForEach) == 0 {
		if task.Item != 0 || len(task.Value) > 0 {
			return envelope.Refuse(envelope.ReasonInvalidJob, fmt.Sprintf("step %s has no for_each: it has one job, item 0, with no value", s.Name))
		}
		return nil
	}
	if task.Item < 0 || task.Item >= envelope.MaxForEachItems {
		return envelope.Refuse(envelope.ReasonInvalidJob, fmt.Sprintf("step %s has no item %d", s.Name, task.Item))
	}
	var list []json.RawMessage
	switch name, ok := s.ForEachArg(); {
	case ok:
		var args map[string]json.RawMessage
		_ = json.Unmarshal(fl.Args, &args)
		_ = json.Unmarshal(args[name], &list)
	default:
		if _, fromStep := s.ForEachStep(); fromStep {
			return nil // the list is an earlier step's output (not signed)
		}
		_ = json.Unmarshal(s.ForEach, &list)
	}
	if task.Item >= len(list) {
		return envelope.Refuse(envelope.ReasonInvalidJob, fmt.Sprintf("step %s fans out over %d items, not %d", s.Name, len(list), task.Item+1))
	}
	if !jsonEqual(list[task.Item], task.Value) {
		return envelope.Refuse(envelope.ReasonInvalidJob, fmt.Sprintf("step %s item %d: the value carried is not the one the flow was signed with", s.Name, task.Item))
	}
	return nil
}

// stepArgs is what a step reads as job.args: the flow's args, overlaid by
// the step's own.
func stepArgs(flowArgs, own json.RawMessage) (json.RawMessage, error) {
	if len(flowArgs) == 0 {
		return own, nil
	}
	if len(own) == 0 {
		return flowArgs, nil
	}
	var m, o map[string]json.RawMessage
	if json.Unmarshal(flowArgs, &m) != nil || json.Unmarshal(own, &o) != nil {
		return nil, envelope.Refuse(envelope.ReasonInvalidJob, "flow and step args must be JSON objects")
	}
	for k, v := range o {
		m[k] = v
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	if len(b) > envelope.MaxArgsBytes {
		return nil, envelope.Refuse(envelope.ReasonTooLarge, fmt.Sprintf("the flow's and the step's args together are %d bytes, the limit is %d", len(b), envelope.MaxArgsBytes))
	}
	return b, nil
}

func jsonEqual(a, b json.RawMessage) bool {
	var ca, cb bytes.Buffer
	if json.Compact(&ca, a) != nil || json.Compact(&cb, b) != nil {
		return false
	}
	return bytes.Equal(ca.Bytes(), cb.Bytes())
}

package verify

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/writ-fleet/writ/job"
	"sync"
	"time"

	"github.com/writ-fleet/writ/envelope"
)

// StepTask carries one job of a flow to the runner that executes it: the
// flow's envelope as its users signed it, which of its jobs to run, and
// what the step reads. Only Flow is signed; Step and Item are checked
// against it, and Value too when the signed flow holds the list.
type StepTask struct {
	Flow json.RawMessage `json:"flow,omitempty"`
	// FlowRef, in place of Flow, names the flow by its ID: where a flow's
	// steps are kept (coord's job records, a site's queue) the envelope is
	// kept once, and put back in (ExpandStepTask) where it is sent or run.
	FlowRef string `json:"flow_ref,omitempty"`
	Step    string `json:"step"`
	Item    int    `json:"item"`
	// Attempt counts the step's runs from 1: a step may have its retries
	// + 1, each its own job.
	Attempt int             `json:"attempt"`
	Value   json.RawMessage `json:"value,omitempty"`
	// Inputs are the outputs of the steps this one depends on, as coord
	// gathered them. The flow says which steps they may come from; Proofs
	// say what they hold: for each of those steps, one signature per item
	// by the node that made its output (envelope.OutputProof), checked by
	// the runner (Target.Nodes).
	Inputs json.RawMessage                    `json:"inputs,omitempty"`
	Proofs map[string][]*envelope.OutputProof `json:"proofs,omitempty"`
}

// ParseStepTask reads raw as a step task, if it is one (a JSON object with
// a "flow" member and no "payloadType": not a job envelope). ok is false
// for anything else; err is set for a step task that is malformed.
func ParseStepTask(raw []byte) (task *StepTask, ok bool, err error) {
	var probe struct {
		Flow        json.RawMessage `json:"flow"`
		FlowRef     string          `json:"flow_ref"`
		PayloadType *string         `json:"payloadType"`
	}
	if json.Unmarshal(raw, &probe) != nil || (len(probe.Flow) == 0 && probe.FlowRef == "") || probe.PayloadType != nil {
		return nil, false, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	task = &StepTask{}
	if err := dec.Decode(task); err != nil {
		return nil, true, envelope.Refuse(job.ReasonMalformed, "step task: "+err.Error())
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
	if len(task.Flow) == 0 {
		return nil, nil, envelope.Refuse(job.ReasonMalformed, fmt.Sprintf("the step task names flow %.64q but does not carry it (not found where it is kept: expired, or removed)", task.FlowRef))
	}
	env, fl, err := DecodeFlow(task.Flow)
	if err != nil {
		return nil, nil, err
	}
	if len(env.Signatures) == 0 {
		return nil, nil, envelope.Refuse(job.ReasonNoSignature, "flow envelope carries no signatures")
	}
	flowID := env.ID()
	s := fl.Step(task.Step)
	if s == nil {
		return nil, nil, envelope.Refuse(job.ReasonInvalidJob, fmt.Sprintf("flow %s has no step %q", flowID, task.Step))
	}
	if task.Attempt < 1 || task.Attempt > s.Retries+1 {
		return nil, nil, envelope.Refuse(job.ReasonInvalidJob, fmt.Sprintf("step %s may run %d times (retries %d), not a run number %d", s.Name, s.Retries+1, s.Retries, task.Attempt))
	}
	id := envelope.StepJobID(flowID, s.Name, task.Item, task.Attempt)
	if t.ID != "" && t.ID != id {
		return nil, nil, envelope.Refuse(job.ReasonIDMismatch, fmt.Sprintf("the carrier says job %s but step %s item %d run %d of flow %s is job %s: it was altered or swapped in transit", t.ID, s.Name, task.Item, task.Attempt, flowID, id))
	}
	if err := checkItem(fl, s, task); err != nil {
		return nil, nil, err
	}
	site := fl.SiteOf(s)
	if site != t.Site {
		return nil, nil, envelope.Refuse(job.ReasonWrongSite, fmt.Sprintf("step %s is for site %q, not %q", s.Name, site, t.Site))
	}
	if t.Node != "" && s.Node != "" && s.Node != t.Node {
		return nil, nil, envelope.Refuse(job.ReasonWrongNode, fmt.Sprintf("step %s is pinned to node %q, not %q", s.Name, s.Node, t.Node))
	}
	if err := fl.CheckTime(now); err != nil {
		return nil, nil, err
	}
	if err := checkInputs(ctx, trust, t, flowID, fl, s, task); err != nil {
		return nil, nil, err
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
			return envelope.Refuse(job.ReasonInvalidJob, fmt.Sprintf("step %s has no for_each: it has one job, item 0, with no value", s.Name))
		}
		return nil
	}
	if task.Item < 0 || task.Item >= envelope.MaxForEachItems {
		return envelope.Refuse(job.ReasonInvalidJob, fmt.Sprintf("step %s has no item %d", s.Name, task.Item))
	}
	var list []json.RawMessage
	switch name, ok := s.ForEachArg(); {
	case ok:
		var args map[string]json.RawMessage
		_ = json.Unmarshal(fl.Args, &args)
		_ = json.Unmarshal(args[name], &list)
	default:
		if src, fromStep := s.ForEachStep(); fromStep {
			// The list is an earlier step's output: one of the inputs,
			// whose signature checkInputs checks.
			var in map[string]json.RawMessage
			_ = json.Unmarshal(task.Inputs, &in)
			_ = json.Unmarshal(in[src], &list)
			break
		}
		_ = json.Unmarshal(s.ForEach, &list)
	}
	if task.Item >= len(list) {
		return envelope.Refuse(job.ReasonInvalidJob, fmt.Sprintf("step %s fans out over %d items, not %d", s.Name, len(list), task.Item+1))
	}
	if !jsonEqual(list[task.Item], task.Value) {
		return envelope.Refuse(job.ReasonInvalidJob, fmt.Sprintf("step %s item %d: the value carried is not the one the flow was signed with", s.Name, task.Item))
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
		return nil, envelope.Refuse(job.ReasonInvalidJob, "flow and step args must be JSON objects")
	}
	for k, v := range o {
		m[k] = v
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	if len(b) > envelope.MaxArgsBytes {
		return nil, envelope.Refuse(job.ReasonTooLarge, fmt.Sprintf("the flow's and the step's args together are %d bytes, the limit is %d", len(b), envelope.MaxArgsBytes))
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

// checkInputs checks a step's inputs: each names a step it depends on
// (finally reads the flow's outcome, "flow", which coord makes); with
// t.Nodes, each element is what a node of the producing step's site signed
// for that step's job of that item (unless t.UnsignedInputs and no
// signature is carried), and a fan-out's outputs are all there when the
// flow says how many there are.
func checkInputs(ctx context.Context, trust TrustSource, t Target, flowID string, fl *envelope.Flow, s *envelope.Step, task *StepTask) error {
	if len(task.Inputs) == 0 && len(task.Proofs) == 0 {
		if len(s.DependsOn) > 0 && t.Nodes != nil {
			return envelope.Refuse(job.ReasonBadInput, fmt.Sprintf("step %s depends on %v but was given no inputs", s.Name, s.DependsOn))
		}
		return nil
	}
	var in map[string]json.RawMessage
	if err := json.Unmarshal(task.Inputs, &in); err != nil || in == nil {
		return envelope.Refuse(job.ReasonMalformed, "step inputs must be a JSON object")
	}
	deps := map[string]bool{}
	for _, d := range s.DependsOn {
		deps[d] = true
	}
	for name := range in {
		if !deps[name] && !(s == fl.Finally && name == "flow") {
			return envelope.Refuse(job.ReasonInvalidJob, fmt.Sprintf("step %s was given the input %q, but it depends on no such step", s.Name, name))
		}
	}
	for name := range task.Proofs {
		if !deps[name] {
			return envelope.Refuse(job.ReasonInvalidJob, fmt.Sprintf("step %s was given proofs for %q, but it depends on no such step", s.Name, name))
		}
	}
	if t.Nodes == nil {
		return nil
	}
	for _, d := range s.DependsOn {
		raw, ok := in[d]
		if !ok {
			return envelope.Refuse(job.ReasonBadInput, fmt.Sprintf("step %s depends on %s but was not given its output", s.Name, d))
		}
		if err := checkInput(ctx, trust, t, flowID, fl, fl.Step(d), raw, task.Proofs[d], in); err != nil {
			return err
		}
	}
	return nil
}

// checkInput checks the output of dependency ds as given (raw) against
// its proofs.
func checkInput(ctx context.Context, trust TrustSource, t Target, flowID string, fl *envelope.Flow, ds *envelope.Step, raw json.RawMessage, proofs []*envelope.OutputProof, in map[string]json.RawMessage) error {
	refuse := func(format string, a ...any) error {
		return envelope.Refuse(job.ReasonBadInput, fmt.Sprintf("input %s: ", ds.Name)+fmt.Sprintf(format, a...))
	}
	outs := []json.RawMessage{raw}
	if len(ds.ForEach) > 0 {
		outs = nil
		if err := json.Unmarshal(raw, &outs); err != nil || outs == nil {
			return refuse("a fan-out's output must be a list")
		}
		if n, known := fanOutSize(fl, ds, in); known && n != len(outs) {
			return refuse("%d outputs given, but the step fans out over %d items", len(outs), n)
		}
	}
	if len(proofs) != 0 && len(proofs) != len(outs) {
		return refuse("%d outputs but %d proofs", len(outs), len(proofs))
	}
	site := fl.SiteOf(ds)
	for i, out := range outs {
		var p *envelope.OutputProof
		if len(proofs) > 0 {
			p = proofs[i]
		}
		if p == nil {
			switch {
			case ds.ContinueOnFailure && isNull(out):
				continue // an item that failed has no output, and its flow goes on
			case t.UnsignedInputs:
				continue
			}
			return refuse("item %d's output carries no node's signature", i)
		}
		if p.Attempt < 1 || p.Attempt > ds.Retries+1 {
			return refuse("item %d: run %d of a step that runs at most %d times", i, p.Attempt, ds.Retries+1)
		}
		pub, err := SiteNode(ctx, t.Nodes, trust, site, p.Node)
		switch {
		case errors.Is(err, ErrNotSiteNode):
			return refuse("item %d was signed by a node that may not act for site %q: %v", i, site, err)
		case err != nil:
			return err
		}
		if err := envelope.VerifyOutput(pub, envelope.StepJobID(flowID, ds.Name, i, p.Attempt), out, p.Sig); err != nil {
			return refuse("item %d (run %d, node %s): %v: it was altered after the node made it", i, p.Attempt, p.Node, err)
		}
	}
	return nil
}

// fanOutSize is how many items step ds fans out over, when the signed flow
// says (a list in it or its args) or a proven input does (the step ds fans
// out over is also a dependency of the reader).
func fanOutSize(fl *envelope.Flow, ds *envelope.Step, in map[string]json.RawMessage) (int, bool) {
	src := ds.ForEach
	if name, ok := ds.ForEachArg(); ok {
		var args map[string]json.RawMessage
		_ = json.Unmarshal(fl.Args, &args)
		src = args[name]
	} else if name, ok := ds.ForEachStep(); ok {
		if src, ok = in[name]; !ok {
			return 0, false
		}
	}
	var list []json.RawMessage
	if err := json.Unmarshal(src, &list); err != nil {
		return 0, false
	}
	return len(list), true
}

func isNull(raw json.RawMessage) bool { return string(bytes.TrimSpace(raw)) == "null" }

// FlowRefOf reports the flow a step task names instead of carrying it
// ("" for any other payload).
func FlowRefOf(raw []byte) string {
	task, ok, err := ParseStepTask(raw)
	if !ok || err != nil || len(task.Flow) > 0 {
		return ""
	}
	return task.FlowRef
}

// ExpandStepTask returns step task raw carrying flow (the envelope its
// FlowRef names) in place of the reference.
func ExpandStepTask(raw, flow []byte) ([]byte, error) {
	task, ok, err := ParseStepTask(raw)
	if !ok || err != nil {
		return nil, fmt.Errorf("not a step task: %v", err)
	}
	task.Flow, task.FlowRef = flow, ""
	return json.Marshal(task)
}

// RefStepTask returns step task task naming its flow by id in place of
// carrying it.
func RefStepTask(task StepTask, id string) ([]byte, error) {
	task.Flow, task.FlowRef = nil, id
	return json.Marshal(task)
}

// The steps of a fan-out carry (or are given back) the same flow: its
// envelope is decoded once, and kept by the SHA-256 of its bytes, up to
// maxDecodedBytes of payload. Only the decoding is kept: every step's
// signatures are checked against the trust of the moment. What is kept
// is shared: callers read a Step's Flow and a Checked's Envelope, never
// change them.
var decoded struct {
	sync.Mutex
	flows map[[32]byte]decodedFlow // guarded by Mutex
	bytes int                      // guarded by Mutex
}

type decodedFlow struct {
	env *envelope.Envelope
	fl  *envelope.Flow
}

const maxDecodedBytes = 32 << 20

// DecodeFlow decodes a flow envelope and its flow, or returns the copy
// decoded before.
func DecodeFlow(raw []byte) (*envelope.Envelope, *envelope.Flow, error) {
	key := sha256.Sum256(raw)
	decoded.Lock()
	d, ok := decoded.flows[key]
	decoded.Unlock()
	if ok {
		return d.env, d.fl, nil
	}
	env, err := envelope.Decode(raw)
	if err != nil {
		return nil, nil, err
	}
	fl, err := env.Flow()
	if err != nil {
		return nil, nil, err
	}
	decoded.Lock()
	defer decoded.Unlock()
	if decoded.flows == nil || decoded.bytes+len(env.Payload) > maxDecodedBytes {
		decoded.flows, decoded.bytes = map[[32]byte]decodedFlow{}, 0
	}
	decoded.flows[key] = decodedFlow{env: env, fl: fl}
	decoded.bytes += len(env.Payload)
	return env, fl, nil
}

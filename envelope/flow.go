package envelope

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"github.com/writ-fleet/writ/job"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/writ-fleet/writ/keys"
)

// FlowPayloadType is the DSSE payloadType of a writ flow: a DAG of steps,
// signed once by its users.
const FlowPayloadType = "application/vnd.writ.flow.v1+json"

// Limits of a flow payload.
const (
	// MaxFlowSteps bounds a flow's steps (finally included).
	MaxFlowSteps = 500
	// MaxForEachItems bounds the items of one step's fan-out.
	MaxForEachItems = 1000
	// MaxFlowBytes bounds a flow's encoded payload. Every step task
	// carries the flow's envelope (so each runner checks the flow itself),
	// so this bounds what one task of a fan-out costs Redis too.
	MaxFlowBytes = 1 << 20
	// MaxStepRetries bounds a step's retries.
	MaxStepRetries = 10
	// MaxFlowSites bounds the sites one flow's steps run on (each is
	// checked against its own policy before the flow starts).
	MaxFlowSites = 16
)

// stepNameRe: a step's name is an identifier, so that a dependent reads its
// output as job.inputs.NAME.
var stepNameRe = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,63}$`)

// Flow is the payload of a flow envelope. Its steps run as their
// dependencies allow; each is verified by the runner that executes it
// against the flow's signatures and its place in the flow.
type Flow struct {
	// Name is a label for people.
	Name string `json:"name"`
	// Site is where steps run that name no site of their own.
	Site string `json:"site,omitempty"`
	// Args is a JSON object: the flow's arguments, which a step's for_each
	// may name as "args.NAME".
	Args json.RawMessage `json:"args,omitempty"`
	// Steps, in any order: depends_on makes the DAG.
	Steps []Step `json:"steps"`
	// Finally always runs last, once every step has ended or been
	// skipped, and sees the flow's outcome (job.inputs.flow).
	Finally *Step `json:"finally,omitempty"`
	// NotBefore holds the whole flow until then; zero: start at once.
	NotBefore time.Time `json:"not_before,omitzero"`
	// SignedAt and Expires bound when the flow may be accepted; no step
	// starts after Expires.
	SignedAt time.Time `json:"signed_at"`
	Expires  time.Time `json:"expires"`
	// Nonce makes each signed flow unique; reusing one is a replay.
	Nonce string `json:"nonce"`
}

// Step is one step of a flow: a script run as a job.
type Step struct {
	Name   string `json:"name"`
	Script string `json:"script"`
	// Args are the step's job.args, over the flow's args (a step reads
	// both, its own winning).
	Args json.RawMessage `json:"args,omitempty"`
	// DependsOn names the steps that must succeed (or end, with
	// ContinueOnFailure) first; their outputs are the step's
	// job.inputs.NAME.
	DependsOn []string `json:"depends_on,omitempty"`
	// ForEach fans the step out: a JSON array of items, or "args.NAME"
	// (a list among the flow's args), or the name of a step it depends on
	// whose output is a list. Each item runs as its own job, reading
	// job.item; dependents read the outputs as a list, in item order.
	ForEach json.RawMessage `json:"for_each,omitempty"`
	// Retries is how often a failed run is tried again.
	Retries int `json:"retries,omitempty"`
	// Timeout bounds one run; zero means DefaultTimeout.
	Timeout Duration `json:"timeout,omitempty"`
	// Site and Node place the step (Site defaults to the flow's).
	Site      string    `json:"site,omitempty"`
	Node      string    `json:"node,omitempty"`
	Resources Resources `json:"resources,omitzero"`
	// ContinueOnFailure lets dependents run after this step failed, and
	// the flow go on; a failure is then not the flow's.
	ContinueOnFailure bool `json:"continue_on_failure,omitempty"`
	// NotBefore holds the step until then.
	NotBefore time.Time `json:"not_before,omitzero"`
}

// DefaultFlowValidity is how long a flow built by NewFlow stays valid.
const DefaultFlowValidity = 24 * time.Hour

// NewFlow returns an empty flow valid from now (back-dated by ClockSkew)
// for DefaultFlowValidity, with a random nonce.
func NewFlow(name, site string, now time.Time) *Flow {
	var nonce [16]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		panic("crypto/rand failed: " + err.Error()) // never happens on Linux
	}
	return &Flow{
		Name:     name,
		Site:     site,
		SignedAt: now.Add(-ClockSkew).UTC().Truncate(time.Second),
		Expires:  now.Add(DefaultFlowValidity).UTC().Truncate(time.Second),
		Nonce:    hex.EncodeToString(nonce[:]),
	}
}

// Validate checks the flow's fields, limits and graph: step names unique
// identifiers, every dependency a step of the flow, no cycle, a fan-out
// over a step only over one it depends on. It does not check the time
// window.
func (f *Flow) Validate() error {
	bad := func(format string, a ...any) error {
		return &Error{Reason: job.ReasonInvalidJob, Msg: "flow: " + fmt.Sprintf(format, a...)}
	}
	switch {
	case f.Name == "":
		return bad("name is empty")
	case len(f.Name) > MaxNameLen || !printable(f.Name):
		return bad("name must be 1-%d printable bytes", MaxNameLen)
	case f.Site != "" && !ValidSite(f.Site):
		return bad("site %q is not a valid site name", f.Site)
	case len(f.Steps) == 0:
		return bad("it has no steps")
	case len(f.Steps)+b2i(f.Finally != nil) > MaxFlowSteps:
		return &Error{Reason: job.ReasonTooLarge, Msg: fmt.Sprintf("flow: %d steps, the limit is %d", len(f.Steps)+b2i(f.Finally != nil), MaxFlowSteps)}
	case !nonceRe.MatchString(f.Nonce):
		return bad("nonce must be 8-128 characters of [A-Za-z0-9_-]")
	case f.SignedAt.IsZero() || f.Expires.IsZero():
		return bad("signed_at and expires are both required")
	case !f.Expires.After(f.SignedAt):
		return bad("expires (%s) is not after signed_at (%s)", f.Expires.Format(time.RFC3339), f.SignedAt.Format(time.RFC3339))
	case f.Expires.Sub(f.SignedAt) > MaxValidity:
		return bad("validity window is %s, the limit is %s", f.Expires.Sub(f.SignedAt), MaxValidity)
	case !f.NotBefore.IsZero() && !f.NotBefore.Before(f.Expires):
		return bad("not_before (%s) is not before expires (%s)", f.NotBefore.Format(time.RFC3339), f.Expires.Format(time.RFC3339))
	}
	if err := objectArgs(f.Args, "flow args"); err != nil {
		return err
	}
	sites := map[string]bool{}
	for i := range f.Steps {
		sites[f.SiteOf(&f.Steps[i])] = true
	}
	if f.Finally != nil {
		sites[f.SiteOf(f.Finally)] = true
	}
	if len(sites) > MaxFlowSites {
		return &Error{Reason: job.ReasonTooLarge, Msg: fmt.Sprintf("flow: its steps run on %d sites, the limit is %d", len(sites), MaxFlowSites)}
	}
	byName := map[string]*Step{}
	all := f.Steps
	if f.Finally != nil {
		all = append(all[:len(all):len(all)], *f.Finally)
	}
	for i := range all {
		s := &all[i]
		if !stepNameRe.MatchString(s.Name) {
			return bad("step %d: name %q must be an identifier (letters, digits, _; not a digit first; at most 64)", i+1, s.Name)
		}
		if byName[s.Name] != nil {
			return bad("two steps are named %q", s.Name)
		}
		if s.Name == "flow" {
			return bad(`no step may be named "flow": finally reads the flow's outcome as job.inputs.flow`)
		}
		byName[s.Name] = s
		if err := f.validateStep(s); err != nil {
			return err
		}
	}
	if f.Finally != nil && (len(f.Finally.DependsOn) > 0 || len(f.Finally.ForEach) > 0) {
		return bad("finally runs after every step: it takes no depends_on and no for_each")
	}
	for i := range f.Steps {
		s := &f.Steps[i]
		seen := map[string]bool{}
		for _, d := range s.DependsOn {
			switch {
			case d == s.Name:
				return bad("step %s depends on itself", s.Name)
			case seen[d]:
				return bad("step %s names %s twice in depends_on", s.Name, d)
			case byName[d] == nil || (f.Finally != nil && d == f.Finally.Name):
				return bad("step %s depends on %q, which is not a step of the flow", s.Name, d)
			}
			seen[d] = true
		}
		if src, ok := s.ForEachStep(); ok && !seen[src] {
			return bad("step %s fans out over %s's output, so it must depend on %s", s.Name, src, src)
		}
		if name, ok := s.ForEachArg(); ok {
			var args map[string]json.RawMessage
			_ = json.Unmarshal(f.Args, &args)
			if raw, ok := args[name]; !ok || !isArray(raw) {
				return bad("step %s fans out over args.%s, which is not a list among the flow's args", s.Name, name)
			}
		}
	}
	if _, err := f.Order(); err != nil {
		return err
	}
	return nil
}

func (f *Flow) validateStep(s *Step) error {
	bad := func(format string, a ...any) error {
		return &Error{Reason: job.ReasonInvalidJob, Msg: "flow: step " + s.Name + ": " + fmt.Sprintf(format, a...)}
	}
	switch {
	case s.Script == "":
		return bad("script is empty")
	case len(s.Script) > MaxScriptBytes:
		return &Error{Reason: job.ReasonTooLarge, Msg: fmt.Sprintf("flow: step %s: script is %d bytes, the limit is %d", s.Name, len(s.Script), MaxScriptBytes)}
	case len(s.Args) > MaxArgsBytes:
		return &Error{Reason: job.ReasonTooLarge, Msg: fmt.Sprintf("flow: step %s: args are %d bytes, the limit is %d", s.Name, len(s.Args), MaxArgsBytes)}
	case s.Retries < 0 || s.Retries > MaxStepRetries:
		return bad("retries %d is out of range (0 to %d)", s.Retries, MaxStepRetries)
	case s.Timeout < 0 || time.Duration(s.Timeout) > MaxTimeout:
		return bad("timeout %s is out of range (0 to %s)", time.Duration(s.Timeout), MaxTimeout)
	case s.Site != "" && !ValidSite(s.Site):
		return bad("site %q is not a valid site name", s.Site)
	case s.Site == "" && f.Site == "":
		return bad("it names no site, and neither does the flow")
	case s.Node != "" && !ValidNode(s.Node):
		return bad("node %q is not a valid node id", s.Node)
	case s.Resources.CPU < 0 || s.Resources.MemoryMB < 0 || s.Resources.DiskGB < 0:
		return bad("resources must not be negative")
	case !s.NotBefore.IsZero() && !s.NotBefore.Before(f.Expires):
		return bad("not_before (%s) is not before the flow expires (%s)", s.NotBefore.Format(time.RFC3339), f.Expires.Format(time.RFC3339))
	}
	if err := objectArgs(s.Args, "step "+s.Name+" args"); err != nil {
		return err
	}
	if len(s.ForEach) > 0 {
		_, isStep := s.ForEachStep()
		_, isArg := s.ForEachArg()
		var items []json.RawMessage
		switch {
		case isStep || isArg:
		case json.Unmarshal(s.ForEach, &items) == nil && items != nil:
			if len(items) > MaxForEachItems {
				return &Error{Reason: job.ReasonTooLarge, Msg: fmt.Sprintf("flow: step %s: for_each has %d items, the limit is %d", s.Name, len(items), MaxForEachItems)}
			}
		default:
			return bad(`for_each must be a list, "args.NAME", or the name of a step it depends on`)
		}
	}
	return nil
}

// ForEachStep returns the step whose output s fans out over, if any.
func (s *Step) ForEachStep() (string, bool) {
	var ref string
	if json.Unmarshal(s.ForEach, &ref) != nil || strings.HasPrefix(ref, "args.") || !stepNameRe.MatchString(ref) {
		return "", false
	}
	return ref, true
}

// ForEachArg returns the flow arg s fans out over, if any.
func (s *Step) ForEachArg() (string, bool) {
	var ref string
	if json.Unmarshal(s.ForEach, &ref) != nil {
		return "", false
	}
	name, ok := strings.CutPrefix(ref, "args.")
	return name, ok && name != ""
}

// Step returns the step called name (finally included), or nil.
func (f *Flow) Step(name string) *Step {
	for i := range f.Steps {
		if f.Steps[i].Name == name {
			return &f.Steps[i]
		}
	}
	if f.Finally != nil && f.Finally.Name == name {
		return f.Finally
	}
	return nil
}

// SiteOf is where step s runs.
func (f *Flow) SiteOf(s *Step) string {
	if s.Site != "" {
		return s.Site
	}
	return f.Site
}

// Sites returns the sites the flow's steps (finally included) run on, in
// the order the steps first name them.
func (f *Flow) Sites() []string {
	var out []string
	add := func(s *Step) {
		if site := f.SiteOf(s); !slices.Contains(out, site) {
			out = append(out, site)
		}
	}
	for i := range f.Steps {
		add(&f.Steps[i])
	}
	if f.Finally != nil {
		add(f.Finally)
	}
	return out
}

// Order returns the steps (not finally) in an order that puts every step
// after those it depends on, or an error naming a cycle.
func (f *Flow) Order() ([]*Step, error) {
	idx := make(map[string]int, len(f.Steps))
	for i := range f.Steps {
		idx[f.Steps[i].Name] = i
	}
	const (
		unseen = iota
		visiting
		done
	)
	state := make([]int, len(f.Steps))
	out := make([]*Step, 0, len(f.Steps))
	var visit func(i int, path []string) error
	visit = func(i int, path []string) error {
		switch state[i] {
		case done:
			return nil
		case visiting:
			return &Error{Reason: job.ReasonInvalidJob, Msg: "flow: depends_on makes a cycle: " + strings.Join(append(path, f.Steps[i].Name), " → ")}
		}
		state[i] = visiting
		for _, d := range f.Steps[i].DependsOn {
			j, ok := idx[d]
			if !ok {
				continue // Validate names it
			}
			if err := visit(j, append(path, f.Steps[i].Name)); err != nil {
				return err
			}
		}
		state[i] = done
		out = append(out, &f.Steps[i])
		return nil
	}
	for i := range f.Steps {
		if err := visit(i, nil); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// CheckTime checks that now lies within [signed_at, expires).
func (f *Flow) CheckTime(now time.Time) error {
	if now.Before(f.SignedAt) {
		return &Error{Reason: job.ReasonNotYetValid, Msg: fmt.Sprintf("flow is not valid before %s (now %s)", f.SignedAt.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))}
	}
	if !now.Before(f.Expires) {
		return &Error{Reason: job.ReasonExpired, Msg: fmt.Sprintf("flow expired at %s (now %s)", f.Expires.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))}
	}
	return nil
}

// Sign encodes the flow and returns an envelope signed by k; more keys may
// sign the same envelope (Envelope.Sign) to meet a site's threshold.
func (f *Flow) Sign(k *keys.Key) (*Envelope, error) {
	if err := f.Validate(); err != nil {
		return nil, err
	}
	payload, err := json.Marshal(f)
	if err != nil {
		return nil, fmt.Errorf("encode flow: %w", err)
	}
	if len(payload) > MaxFlowBytes {
		return nil, &Error{Reason: job.ReasonTooLarge, Msg: fmt.Sprintf("flow is %d bytes encoded, the limit is %d", len(payload), MaxFlowBytes)}
	}
	e := New(FlowPayloadType, payload)
	e.Sign(k.ID, k.Private)
	return e, nil
}

// StepJobID is the job ID of attempt attempt (from 1) of item item of step
// step of the flow whose envelope ID is flowID (item 0 for a step without
// for_each): derived, so that every coord and runner agrees on it and a
// step's attempt is deduplicated however often it is submitted; a step has
// at most its retries + 1 attempts, so at most that many job IDs.
func StepJobID(flowID, step string, item, attempt int) string {
	sum := sha256.Sum256(fmt.Appendf(nil, "writ-flow-step\x00%s\x00%s\x00%d\x00%d", flowID, step, item, attempt))
	return hex.EncodeToString(sum[:])
}

// Flow decodes and validates the envelope's payload as a writ flow, as
// strictly as Job does a job: the payloadType first, no name twice at any
// depth, member names exactly as Flow and Step spell them, then Validate.
// It does not verify signatures.
func (e *Envelope) Flow() (*Flow, error) {
	if e.PayloadType != FlowPayloadType {
		return nil, &Error{Reason: job.ReasonPayloadType, Msg: fmt.Sprintf("payloadType is %q, want %q", e.PayloadType, FlowPayloadType)}
	}
	if len(e.Payload) > MaxFlowBytes {
		return nil, &Error{Reason: job.ReasonTooLarge, Msg: fmt.Sprintf("flow is %d bytes, the limit is %d", len(e.Payload), MaxFlowBytes)}
	}
	malformed := func(err error) error { return &Error{Reason: job.ReasonMalformed, Msg: "flow payload: " + err.Error()} }
	obj, err := members(e.Payload, true)
	if err != nil {
		return nil, malformed(err)
	}
	if err := checkExactNames(obj, flowNames, "flow payload"); err != nil {
		return nil, malformed(err)
	}
	var steps []json.RawMessage
	if raw, ok := lookup(obj, "steps"); ok {
		if err := json.Unmarshal(raw, &steps); err != nil {
			return nil, malformed(err)
		}
	}
	if raw, ok := lookup(obj, "finally"); ok && string(raw) != "null" {
		steps = append(steps, raw)
	}
	for i, raw := range steps {
		where := fmt.Sprintf("flow payload step %d", i+1)
		st, err := members(raw, true)
		if err != nil {
			return nil, &Error{Reason: job.ReasonMalformed, Msg: where + ": " + err.Error()}
		}
		if err := checkExactNames(st, stepNames, where); err != nil {
			return nil, &Error{Reason: job.ReasonMalformed, Msg: err.Error()}
		}
		if res, ok := lookup(st, "resources"); ok && string(res) != "null" {
			rm, err := members(res, true)
			if err == nil {
				err = checkExactNames(rm, resourcesNames, where+" resources")
			}
			if err != nil {
				return nil, &Error{Reason: job.ReasonMalformed, Msg: err.Error()}
			}
		}
	}
	dec := json.NewDecoder(bytes.NewReader(e.Payload))
	dec.DisallowUnknownFields()
	var f Flow
	if err := dec.Decode(&f); err != nil {
		return nil, malformed(err)
	}
	if dec.More() {
		return nil, &Error{Reason: job.ReasonMalformed, Msg: "flow payload has trailing data"}
	}
	if err := f.Validate(); err != nil {
		return nil, err
	}
	return &f, nil
}

var (
	flowNames = jsonNames(reflect.TypeFor[Flow]())
	stepNames = jsonNames(reflect.TypeFor[Step]())
)

func objectArgs(raw json.RawMessage, what string) error {
	if len(raw) == 0 {
		return nil
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil || obj == nil {
		return &Error{Reason: job.ReasonInvalidJob, Msg: "flow: " + what + " must be a JSON object"}
	}
	return nil
}

func isArray(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) > 0 && raw[0] == '['
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

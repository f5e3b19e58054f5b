package envelope

import (
	"encoding/json"
	"fmt"
	"github.com/writ-fleet/writ/job"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/keys"
)

func testFlow() *Flow {
	f := NewFlow("example", "lab", time.Now())
	f.Args = json.RawMessage(`{"items":[1,2,3]}`)
	f.Steps = []Step{
		{Name: "fetch", Script: `job := import("job"); job.result(3)`},
		{Name: "double", Script: `job := import("job"); job.result(job.inputs.fetch * 2)`, DependsOn: []string{"fetch"}},
		{Name: "each", Script: `job := import("job"); job.result(job.item)`, ForEach: json.RawMessage(`"args.items"`)},
		{Name: "sum", Script: `x := 1`, DependsOn: []string{"each", "double"}},
	}
	f.Finally = &Step{Name: "cleanup", Script: `x := 1`}
	return f
}

func TestFlow_SignAndDecode(t *testing.T) {
	k, _ := keys.Generate("alice")
	f := testFlow()
	e, err := f.Sign(k)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(e)
	back, err := Decode(raw)
	if err != nil {
		t.Fatal(err)
	}
	got, err := back.Flow()
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Steps) != 4 || got.Finally == nil || got.Finally.Name != "cleanup" || back.ID() != e.ID() {
		t.Fatalf("decoded flow = %+v", got)
	}
	if signers := back.Verify([]TrustedKey{{ID: k.ID, Key: k.Public}}); len(signers) != 1 {
		t.Errorf("signers = %v", signers)
	}
	order, err := got.Order()
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, s := range order {
		pos[s.Name] = i
	}
	if pos["fetch"] > pos["double"] || pos["double"] > pos["sum"] || pos["each"] > pos["sum"] {
		t.Errorf("order = %v", pos)
	}
	// A job envelope is not a flow, nor a flow a job.
	if _, err := back.Job(); ReasonOf(err) != job.ReasonPayloadType {
		t.Errorf("Job() of a flow = %v", err)
	}
	if a, b := StepJobID(e.ID(), "each", 1, 1), StepJobID(e.ID(), "each", 2, 1); a == b || a != StepJobID(e.ID(), "each", 1, 1) || a == StepJobID(e.ID(), "each", 1, 2) || len(a) != 64 {
		t.Errorf("step job IDs %s, %s", a, b)
	}
}

func TestFlow_Refused(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(f *Flow)
		msg  string
	}{
		{"no steps", func(f *Flow) { f.Steps = nil; f.Finally = nil }, "no steps"},
		{"duplicate", func(f *Flow) { f.Steps[1].Name = "fetch" }, `two steps are named "fetch"`},
		{"bad name", func(f *Flow) { f.Steps[0].Name = "fetch-it" }, "must be an identifier"},
		{"reserved", func(f *Flow) { f.Steps[0].Name = "flow"; f.Steps[1].DependsOn = []string{"flow"} }, `no step may be named "flow"`},
		{"unknown dep", func(f *Flow) { f.Steps[1].DependsOn = []string{"nope"} }, `depends on "nope"`},
		{"self", func(f *Flow) { f.Steps[0].DependsOn = []string{"fetch"} }, "depends on itself"},
		{"twice", func(f *Flow) { f.Steps[1].DependsOn = []string{"fetch", "fetch"} }, "names fetch twice"},
		{"on finally", func(f *Flow) { f.Steps[1].DependsOn = []string{"cleanup"} }, `depends on "cleanup"`},
		{"cycle", func(f *Flow) { f.Steps[0].DependsOn = []string{"sum"} }, "cycle: "},
		{"finally deps", func(f *Flow) { f.Finally.DependsOn = []string{"fetch"} }, "finally runs after every step"},
		{"fan over non-dep", func(f *Flow) { f.Steps[3].ForEach = json.RawMessage(`"fetch"`) }, "must depend on fetch"},
		{"fan over missing arg", func(f *Flow) { f.Steps[2].ForEach = json.RawMessage(`"args.nope"`) }, "args.nope"},
		{"fan over object", func(f *Flow) { f.Steps[2].ForEach = json.RawMessage(`{"a":1}`) }, "for_each must be"},
		{"retries", func(f *Flow) { f.Steps[0].Retries = 99 }, "retries 99"},
		{"no site", func(f *Flow) { f.Site = "" }, "names no site"},
		{"args", func(f *Flow) { f.Steps[0].Args = json.RawMessage(`[1]`) }, "must be a JSON object"},
		{"window", func(f *Flow) { f.Expires = f.SignedAt.Add(8 * 24 * time.Hour) }, "validity window"},
		{"too many sites", func(f *Flow) {
			for i := range 17 {
				f.Steps = append(f.Steps, Step{Name: fmt.Sprintf("x%d", i), Script: "x := 1", Site: fmt.Sprintf("site-%d", i)})
			}
		}, "sites, the limit is 16"},
		{"held past expiry", func(f *Flow) { f.Steps[0].NotBefore = f.Expires.Add(time.Hour) }, "not before the flow expires"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := testFlow()
			tc.edit(f)
			err := f.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Validate = %v, want %q", err, tc.msg)
			}
		})
	}
}

// TestFlow_Strict: what a reviewer and writ read must be the same flow.
func TestFlow_Strict(t *testing.T) {
	k, _ := keys.Generate("alice")
	e, err := testFlow().Sign(k)
	if err != nil {
		t.Fatal(err)
	}
	good := string(e.Payload)
	for _, tc := range []struct{ name, payload, msg string }{
		{"step key twice", strings.Replace(good, `"name":"fetch",`, `"name":"fetch","name":"evil",`, 1), "twice"},
		{"case variant", strings.Replace(good, `"depends_on":["fetch"]`, `"Depends_On":["fetch"]`, 1), "case-sensitive"},
		{"unknown step key", strings.Replace(good, `"name":"fetch",`, `"name":"fetch","shell":"rm -rf /",`, 1), `unknown key "shell"`},
		{"unknown finally key", strings.Replace(good, `"name":"cleanup",`, `"name":"cleanup","x":1,`, 1), `unknown key "x"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.payload == good {
				t.Fatal("the edit did not apply")
			}
			bad := New(FlowPayloadType, []byte(tc.payload))
			if _, err := bad.Flow(); ReasonOf(err) != job.ReasonMalformed || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Flow() = %v, want malformed mentioning %q", err, tc.msg)
			}
		})
	}
}

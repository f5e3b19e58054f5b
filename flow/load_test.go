package flow

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/keys"
)

func TestLoad_Example(t *testing.T) {
	fl, err := Load("testdata/example.yaml", Options{Site: "lab", Args: map[string]json.RawMessage{"extra": json.RawMessage(`1`)}})
	if err != nil {
		t.Fatal(err)
	}
	if fl.Site != "lab" || len(fl.Steps) != 4 || fl.Finally == nil {
		t.Fatalf("flow = %+v", fl)
	}
	if !strings.Contains(fl.Steps[0].Script, "job.result(job.args.n)") || !strings.Contains(fl.Steps[1].Script, "job.inputs.fetch * 2") {
		t.Errorf("scripts not embedded: %q, %q", fl.Steps[0].Script, fl.Steps[1].Script)
	}
	if string(fl.Steps[2].ForEach) != `"args.items"` || fl.Steps[3].Retries != 2 || time.Duration(fl.Steps[3].Timeout) != 30*time.Second {
		t.Errorf("steps = %+v", fl.Steps)
	}
	var args map[string]any
	json.Unmarshal(fl.Args, &args)
	if args["extra"] != 1.0 || len(args["items"].([]any)) != 3 {
		t.Errorf("args = %s", fl.Args)
	}
	k, _ := keys.Generate("alice")
	e, err := fl.Sign(k)
	if err != nil {
		t.Fatal(err)
	}
	if back, err := e.Flow(); err != nil || back.Steps[1].Name != "double" {
		t.Errorf("signed flow decodes to %+v, %v", back, err)
	}
}

func TestParse_Refused(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "ok.tengo"), []byte("x := 1"), 0o600)
	outside := filepath.Join(t.TempDir(), "secret.tengo")
	os.WriteFile(outside, []byte("the signer's secret"), 0o600)
	os.Symlink(outside, filepath.Join(dir, "link.tengo"))
	root, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	for _, tc := range []struct{ name, doc, msg string }{
		{"unknown key", "name: x\nsteps: [{name: a, script: ok.tengo, shell: ls}]", "shell"},
		{"unknown top key", "name: x\nsteps: [{name: a, script: ok.tengo}]\nhooks: 1", "hooks"},
		{"no steps", "name: x\nsteps: []", "minItems"},
		{"bad name", "name: x\nsteps: [{name: a-b, script: ok.tengo}]", "a-b"},
		{"bad for_each", "name: x\nsteps: [{name: a, script: ok.tengo, for_each: {x: 1}}]", "for_each"},
		{"finally depends", "name: x\nsteps: [{name: a, script: ok.tengo}]\nfinally: {name: f, script: ok.tengo, depends_on: [a]}", "finally"},
		{"duplicate key", "name: x\nname: y\nsteps: [{name: a, script: ok.tengo}]", "already defined"},
		{"bad timeout", "name: x\nsteps: [{name: a, script: ok.tengo, timeout: soon}]", "timeout"},
		{"parent", "name: x\nsteps: [{name: a, script: ../ok.tengo}]", "inside the flow's directory"},
		{"absolute", "name: x\nsteps: [{name: a, script: " + outside + "}]", "inside the flow's directory"},
		{"symlink out", "name: x\nsteps: [{name: a, script: link.tengo}]", "escapes from parent"},
		{"missing", "name: x\nsteps: [{name: a, script: nope.tengo}]", "nope.tengo"},
		{"cycle", "name: x\nsteps: [{name: a, script: ok.tengo, depends_on: [b]}, {name: b, script: ok.tengo, depends_on: [a]}]", "cycle"},
		{"no site", "name: x\nsteps: [{name: a, script: ok.tengo}]", "names no site"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			site := "lab"
			if tc.name == "no site" {
				site = ""
			}
			fl, err := Parse([]byte(tc.doc), root, Options{Site: site})
			if err == nil || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Parse = %v, %v; want an error mentioning %q", fl, err, tc.msg)
			}
			if fl != nil {
				for _, s := range fl.Steps {
					if strings.Contains(s.Script, "secret") {
						t.Errorf("a file outside the flow's directory was embedded")
					}
				}
			}
		})
	}
}

// TestSchema_MatchesPayload: every field the schema lets an author write
// is one the loader reads, and the other way round.
func TestSchema_MatchesPayload(t *testing.T) {
	var s struct {
		Properties map[string]any `json:"properties"`
		Defs       struct {
			Step struct {
				Properties map[string]any `json:"properties"`
			} `json:"step"`
		} `json:"$defs"`
	}
	if err := json.Unmarshal(Schema, &s); err != nil {
		t.Fatal(err)
	}
	check := func(what string, props map[string]any, v any) {
		names := map[string]bool{}
		b, _ := json.Marshal(v)
		var m map[string]any
		json.Unmarshal(b, &m)
		for k := range m {
			names[k] = true
			if _, ok := props[k]; !ok {
				t.Errorf("%s field %q is not in the schema", what, k)
			}
		}
		for k := range props {
			if !names[k] {
				t.Errorf("the schema's %s property %q is not read", what, k)
			}
		}
	}
	check("document", s.Properties, document{})
	check("step", s.Defs.Step.Properties, docStep{})
	if _, err := schema(); err != nil {
		t.Fatal(err)
	}
}

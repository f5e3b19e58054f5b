package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/keys"
)

// TestHelp_EveryCommand: every command explains itself: a short line, and
// --help runs.
func TestHelp_EveryCommand(t *testing.T) {
	var walk func(c *cobra.Command)
	seen := 0
	walk = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			if sub.Hidden || sub.Name() == "help" || sub.Name() == "completion" {
				continue
			}
			seen++
			if strings.TrimSpace(sub.Short) == "" {
				t.Errorf("%q has no short help", sub.CommandPath())
			}
			walk(sub)
		}
	}
	root := rootCommand()
	walk(root)
	if seen < 20 {
		t.Errorf("found %d commands, want the whole tree", seen)
	}
	for _, args := range [][]string{{"--help"}, {"run", "--help"}, {"dev", "--help"}, {"job", "sign", "--help"}, {"runner", "--help"}} {
		root := rootCommand()
		var out bytes.Buffer
		root.SetOut(&out)
		root.SetArgs(args)
		if err := root.Execute(); err != nil {
			t.Errorf("writ %s: %v", strings.Join(args, " "), err)
		}
		if out.Len() < 200 {
			t.Errorf("writ %s printed only %q", strings.Join(args, " "), out.String())
		}
	}
}

func TestSignFlags_ParseArgs(t *testing.T) {
	f := &signFlags{args: []string{"n=3", "name=web", `list=[1,2]`, "quoted=\"x\""}}
	got, err := f.parseArgs()
	if err != nil {
		t.Fatal(err)
	}
	want := `{"list":[1,2],"n":3,"name":"web","quoted":"x"}`
	if string(got) != want {
		t.Errorf("parseArgs = %s, want %s", got, want)
	}
	if _, err := (&signFlags{args: []string{"novalue"}}).parseArgs(); err == nil {
		t.Error("parseArgs accepted an arg without =")
	}
}

// TestFlowSign: writ flow sign embeds the scripts and signs; cosign adds a
// second signature; an envelope that is not a flow is refused.
func TestFlowSign(t *testing.T) {
	dir := t.TempDir()
	k1, k2 := filepath.Join(dir, "k1"), filepath.Join(dir, "k2")
	for _, k := range []string{k1, k2} {
		key, _ := keys.Generate("t")
		if err := key.Save(k); err != nil {
			t.Fatal(err)
		}
	}
	run := func(args ...string) error {
		root := rootCommand()
		root.SetArgs(args)
		root.SetOut(io.Discard)
		return root.Execute()
	}
	out := filepath.Join(dir, "ex.flow")
	if err := run("flow", "sign", "../../flow/testdata/example.yaml", "--site", "lab", "--key", k1, "--arg", "extra=2", "-o", out); err != nil {
		t.Fatal(err)
	}
	if err := run("flow", "cosign", out, "--key", k2); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(out)
	env, err := envelope.Decode(data)
	if err != nil {
		t.Fatal(err)
	}
	fl, err := env.Flow()
	if err != nil || len(env.Signatures) != 2 || !strings.Contains(fl.Steps[0].Script, "job.args.n") || !strings.Contains(string(fl.Args), `"extra":2`) {
		t.Fatalf("signed flow: %d signatures, %+v, %v", len(env.Signatures), fl, err)
	}
	job := filepath.Join(dir, "x.job")
	script := filepath.Join(dir, "x.tengo")
	os.WriteFile(script, []byte("x := 1"), 0o600)
	if err := run("job", "sign", script, "--site", "lab", "--key", k1, "-o", job); err != nil {
		t.Fatal(err)
	}
	if err := run("flow", "cosign", job, "--key", k2); err == nil || !strings.Contains(err.Error(), "payload_type") {
		t.Errorf("flow cosign of a job = %v", err)
	}
}

package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/spf13/cobra"
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

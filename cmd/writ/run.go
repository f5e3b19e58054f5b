package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/envelope"
)

type runCmd struct {
	signFlags
	coord string
	sec   *sec // nil: the CA of --ca
}

func runCommand() *cobra.Command {
	c := &runCmd{}
	cmd := &cobra.Command{
		Use:   "run SCRIPT",
		Short: "Sign, submit and watch a script: the result is printed as JSON",
		Long: `Sign SCRIPT as a job, submit it to coord and follow it to the end. Progress
and log lines go to stderr; the result (what the script passed to
job.result) goes to stdout as JSON. The exit status is 0 when the job
succeeded, and 1 with the reason when it failed or was rejected.`,
		Example: `  writ run scripts/lib/hello.tengo --arg who=world
  writ run deploy.tengo --site lab --node n1 --arg cpus=2 --timeout 10m`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.add(cmd)
	coordFlag(cmd, &c.coord)
	return cmd
}

// Run signs, submits and watches.
func (c *runCmd) Run(ctx context.Context, args []string) error {
	env, err := c.sign(args[0])
	if err != nil {
		return err
	}
	cl, err := newCoordClient(c.coord, c.key, c.sec, c.ca.path())
	if err != nil {
		return err
	}
	id, err := submit(ctx, cl, env)
	if err != nil {
		return err
	}
	return watch(ctx, cl, id)
}

// submit sends a signed job to coord and returns its ID. A rejection is
// printed with its reason and becomes exit status 1.
func submit(ctx context.Context, cl *coord.Client, env *envelope.Envelope) (string, error) {
	raw, err := json.Marshal(env)
	if err != nil {
		return "", err
	}
	rep, err := cl.Submit(ctx, raw)
	if err != nil {
		var re *coord.RejectedError
		if errors.As(err, &re) {
			fmt.Fprintf(os.Stderr, "✘ %v\n", err)
			return "", &exitError{code: 1}
		}
		return "", err
	}
	fmt.Fprintf(os.Stderr, "● job %s %s\n", rep.ID, rep.State)
	return rep.ID, nil
}

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/flow"
)

func flowCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "flow",
		Short: "Sign, run and follow flows: DAGs of steps, each a script run as a job, signed once",
		Long: `A flow is a YAML document (flow/flow.schema.json): a name and a list of
steps, each with a name and a script (a .tengo file beside the flow, or the
source inline), args, depends_on, for_each (fan-out), retries, timeout,
site/node/resources and continue_on_failure, and an optional finally step.
writ flow sign embeds every script and signs the whole flow as one DSSE
envelope; writ flow cosign adds a signature, for sites that need several;
writ flow run signs, submits and follows one; get, ls, watch and cancel
act on submitted flows.`,
	}
	cmd.AddCommand(flowSignCommand(), flowCosignCommand())
	cmd.AddCommand(flowClientCommands()...)
	return cmd
}

type flowSignCmd struct {
	signFlags
	out string
}

func flowSignCommand() *cobra.Command {
	c := &flowSignCmd{}
	cmd := &cobra.Command{
		Use:   "sign FILE",
		Short: "Sign a flow document as a flow envelope (DSSE JSON)",
		Long: `Read the flow document FILE, check it against the flow schema and the
flow's rules (step names, dependencies, no cycle, fan-outs), embed the
scripts it names (paths relative to FILE, inside its directory), and write
the flow signed with your key.`,
		Example: `  writ flow sign deploy.yaml --site lab --arg name=web -o deploy.flow
  writ flow cosign deploy.flow --key bob.key     # a second signer, for k-of-n sites`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.addFlowFlags(cmd)
	cmd.Flags().StringVarP(&c.out, "output", "o", "-", "where to write the envelope (- for stdout)")
	return cmd
}

// addFlowFlags adds the flags that build a flow from its document.
func (c *flowSignCmd) addFlowFlags(cmd *cobra.Command) {
	c.addSigning(cmd)
	fl := cmd.Flags()
	fl.StringArrayVar(&c.args, "arg", nil, "flow argument key=value (repeatable, over the document's args); a value that is valid JSON is taken as JSON, else as a string")
	fl.StringVar(&c.argsFile, "args-file", "", "JSON object file of flow arguments (--arg values override it)")
	fl.DurationVar(&c.valid, "valid", envelope.DefaultFlowValidity, "how long the signed flow may be submitted; no step starts after it")
}

// signFile loads the flow document at path, with the flags' args, and
// signs it.
func (c *flowSignCmd) signFile(path string) (*envelope.Envelope, error) {
	raw, err := c.parseArgs()
	if err != nil {
		return nil, err
	}
	var over map[string]json.RawMessage
	if raw != nil {
		if err := json.Unmarshal(raw, &over); err != nil {
			return nil, err
		}
	}
	fl, err := flow.Load(path, flow.Options{Site: c.site, Args: over, Valid: c.valid})
	if err != nil {
		return nil, err
	}
	k, err := loadKey(c.key)
	if err != nil {
		return nil, err
	}
	return fl.Sign(k)
}

// Run signs the flow document.
func (c *flowSignCmd) Run(_ context.Context, args []string) error {
	env, err := c.signFile(args[0])
	if err != nil {
		return err
	}
	return writeEnvelope(c.out, env)
}

type flowCosignCmd struct{ key, out string }

func flowCosignCommand() *cobra.Command {
	c := &flowCosignCmd{}
	cmd := &cobra.Command{
		Use:   "cosign FILE",
		Short: "Add your signature to a signed flow (for sites that require several signers)",
		Args:  cobra.ExactArgs(1),
		RunE:  func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	cmd.Flags().StringVar(&c.key, "key", "", "signing key file (default $WRIT_KEY)")
	cmd.Flags().StringVarP(&c.out, "output", "o", "", "where to write the envelope (default: FILE, in place)")
	return cmd
}

// Run adds a signature, after checking what is signed is a valid flow.
func (c *flowCosignCmd) Run(_ context.Context, args []string) error {
	return cosign(args[0], c.key, c.out, func(data []byte) (*envelope.Envelope, error) {
		env, err := envelope.Decode(data)
		if err == nil {
			_, err = env.Flow()
		}
		return env, err
	})
}

func flowClientCommands() []*cobra.Command {
	return []*cobra.Command{flowRunCommand(), flowSubmitCommand(), flowGetCommand(), flowListCommand(), flowWatchCommand(), flowCancelCommand()}
}

type flowRunCmd struct {
	flowSignCmd
	coord string
	quiet bool
}

func flowRunCommand() *cobra.Command {
	c := &flowRunCmd{}
	cmd := &cobra.Command{
		Use:   "run FILE",
		Short: "Sign a flow document, submit it and follow it to its end",
		Long: `Sign the flow document FILE (as writ flow sign does), submit it to coord
and follow it: each step's state and time on stderr as they change, then
the outputs on stdout as one JSON object keyed by step name. The exit
status is 1 if the flow failed, was cancelled or was refused.`,
		Example: `  writ flow run deploy.yaml --site lab --arg name=web`,
		Args:    cobra.ExactArgs(1),
		RunE:    func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.addFlowFlags(cmd)
	cmd.Flags().BoolVarP(&c.quiet, "quiet", "q", false, "no progress on stderr")
	coordFlag(cmd, &c.coord)
	return cmd
}

// Run signs, submits and follows the flow.
func (c *flowRunCmd) Run(ctx context.Context, args []string) error {
	env, err := c.signFile(args[0])
	if err != nil {
		return err
	}
	body, _ := json.Marshal(env)
	cl, err := newCoordClient(c.coord, c.key, nil, c.ca.path())
	if err != nil {
		return err
	}
	rep, err := cl.SubmitFlow(ctx, body)
	if err != nil {
		return err
	}
	var progress io.Writer = os.Stderr
	if c.quiet {
		progress = io.Discard
	}
	return followFlow(ctx, cl, rep.ID, progress)
}

type flowSubmitCmd struct{ coordFlags }

func flowSubmitCommand() *cobra.Command {
	c := &flowSubmitCmd{}
	cmd := &cobra.Command{
		Use:   "submit FILE",
		Short: "Submit a signed flow envelope to coord (- reads stdin)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			data, err := readFileOrStdin(args[0])
			if err != nil {
				return err
			}
			cl, err := c.client()
			if err != nil {
				return err
			}
			rep, err := cl.SubmitFlow(cmd.Context(), data)
			if err != nil {
				return err
			}
			printJSON(map[string]string{"id": rep.ID, "state": rep.State})
			return nil
		},
	}
	c.add(cmd)
	return cmd
}

func flowGetCommand() *cobra.Command {
	return coordIDCommand("get ID", "Show a flow: its state, every step's state, attempts, output and error, as JSON",
		func(ctx context.Context, cl *coord.Client, id string) (any, error) { return cl.Flow(ctx, id) })
}

type flowListCmd struct{ coordFlags }

func flowListCommand() *cobra.Command {
	c := &flowListCmd{}
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List your flows, newest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := c.client()
			if err != nil {
				return err
			}
			list, err := cl.Flows(cmd.Context())
			if err != nil {
				return err
			}
			for _, f := range list {
				fmt.Printf("%s  %-10s %s\n", f.ID, f.State, f.Name)
			}
			return nil
		},
	}
	c.add(cmd)
	return cmd
}

type flowWatchCmd struct{ coordFlags }

func flowWatchCommand() *cobra.Command {
	c := &flowWatchCmd{}
	cmd := &cobra.Command{
		Use:   "watch ID",
		Short: "Follow a flow until it ends: its steps on stderr, its outputs on stdout",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := c.client()
			if err != nil {
				return err
			}
			return followFlow(cmd.Context(), cl, args[0], os.Stderr)
		},
	}
	c.add(cmd)
	return cmd
}

func flowCancelCommand() *cobra.Command {
	return coordIDCommand("cancel ID", "Cancel a flow: nothing more of it starts, and its running steps are stopped",
		func(ctx context.Context, cl *coord.Client, id string) (any, error) {
			rep, err := cl.CancelFlow(ctx, id)
			if err != nil {
				return nil, err
			}
			return map[string]string{"id": rep.ID, "state": rep.State}, nil
		})
}

// coordIDCommand is a command that calls coord about one ID and prints
// the answer as JSON.
func coordIDCommand(use, short string, call func(context.Context, *coord.Client, string) (any, error)) *cobra.Command {
	c := &coordFlags{}
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := c.client()
			if err != nil {
				return err
			}
			out, err := call(cmd.Context(), cl, args[0])
			if err != nil {
				return err
			}
			printJSON(out)
			return nil
		},
	}
	c.add(cmd)
	return cmd
}

// followFlow prints each step's state as it changes to progress (from
// the flow's event stream), until the flow ends; then its outputs as one
// JSON object on stdout. A flow that did not succeed exits 1.
func followFlow(ctx context.Context, cl *coord.Client, id string, progress io.Writer) error {
	seen := map[string]string{}
	start := time.Now()
	var ended *coord.FlowEvent
	err := cl.WatchFlow(ctx, id, func(ev coord.FlowStreamEvent) bool {
		switch {
		case ev.Step != nil:
			if line, changed := stepLine(*ev.Step, seen, time.Since(start)); changed {
				fmt.Fprintln(progress, line)
			}
		case ev.Flow != nil && flow.Ended(ev.Flow.State):
			ended = ev.Flow
		}
		return true
	})
	if err != nil {
		return err
	}
	if ended == nil {
		return fmt.Errorf("flow %s: its stream ended before the flow did", id)
	}
	fmt.Fprintf(progress, "flow %s %s after %s\n", id, ended.State, time.Since(start).Round(100*time.Millisecond))
	rep, err := cl.Flow(ctx, id)
	if err != nil {
		return err
	}
	out := rep.Outputs
	if out == nil {
		out = map[string]json.RawMessage{}
	}
	printJSON(out)
	if rep.State != flow.StateSucceeded {
		if rep.Error != "" {
			fmt.Fprintln(os.Stderr, "writ: flow "+rep.State+": "+rep.Error)
		}
		return &exitError{code: 1}
	}
	return nil
}

// stepLine is the progress line of step s, and whether it differs from
// the one seen last for the step (seen is updated).
func stepLine(s flow.StepSummary, seen map[string]string, since time.Duration) (string, bool) {
	name := s.Step
	if s.Finally {
		name += " (finally)"
	}
	state := s.State
	if s.Items > 1 {
		state = fmt.Sprintf("%s %d/%d", s.State, s.Ended, s.Items)
	}
	if s.Runs > s.Items && s.Items > 0 {
		state += fmt.Sprintf(" (%d runs)", s.Runs)
	}
	if seen[name] == state {
		return "", false
	}
	seen[name] = state
	line := fmt.Sprintf("  %-20s %-16s %6s", name, state, since.Round(100*time.Millisecond))
	if s.Error != "" {
		line += "  " + s.Error
	}
	return line, true
}

// readFileOrStdin reads a flow envelope from path, or stdin for "-".
func readFileOrStdin(path string) ([]byte, error) {
	if path == "-" {
		b, err := io.ReadAll(io.LimitReader(os.Stdin, 2*envelope.MaxFlowBytes))
		return b, err
	}
	return os.ReadFile(path)
}

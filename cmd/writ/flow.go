package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/flow"
)

func flowCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "flow",
		Short: "Sign flows: DAGs of steps, each a script run as a job, signed once",
		Long: `A flow is a YAML document (flow/flow.schema.json): a name and a list of
steps, each with a name and a script (a .tengo file beside the flow, or the
source inline), args, depends_on, for_each (fan-out), retries, timeout,
site/node/resources and continue_on_failure, and an optional finally step.
writ flow sign embeds every script and signs the whole flow as one DSSE
envelope; writ flow cosign adds a signature, for sites that need several.`,
	}
	cmd.AddCommand(flowSignCommand(), flowCosignCommand())
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
	c.addSigning(cmd)
	fl := cmd.Flags()
	fl.StringArrayVar(&c.args, "arg", nil, "flow argument key=value (repeatable, over the document's args); a value that is valid JSON is taken as JSON, else as a string")
	fl.StringVar(&c.argsFile, "args-file", "", "JSON object file of flow arguments (--arg values override it)")
	fl.DurationVar(&c.valid, "valid", envelope.DefaultFlowValidity, "how long the signed flow may be submitted; no step starts after it")
	fl.StringVarP(&c.out, "output", "o", "-", "where to write the envelope (- for stdout)")
	return cmd
}

// Run signs the flow document.
func (c *flowSignCmd) Run(_ context.Context, args []string) error {
	raw, err := c.parseArgs()
	if err != nil {
		return err
	}
	var over map[string]json.RawMessage
	if raw != nil {
		if err := json.Unmarshal(raw, &over); err != nil {
			return err
		}
	}
	fl, err := flow.Load(args[0], flow.Options{Site: c.site, Args: over, Valid: c.valid})
	if err != nil {
		return err
	}
	k, err := loadKey(c.key)
	if err != nil {
		return err
	}
	env, err := fl.Sign(k)
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
	data, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	env, err := envelope.Decode(data)
	if err == nil {
		_, err = env.Flow()
	}
	if err != nil {
		return fmt.Errorf("%s: %w", args[0], err)
	}
	k, err := loadKey(c.key)
	if err != nil {
		return err
	}
	env.Sign(k.ID, k.Private)
	out := c.out
	if out == "" {
		out = args[0]
	}
	return writeEnvelope(out, env)
}

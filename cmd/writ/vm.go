package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/scripts"
)

// vmCmd asks a node about its VMs. Each question is a small signed job
// pinned to the node: the same path, checks and audit as any other job.
type vmCmd struct {
	signFlags
	coord string
	bytes int
	json  bool
}

func vmCommand() *cobra.Command {
	c := &vmCmd{}
	cmd := &cobra.Command{
		Use:   "vm",
		Short: "Look at a node's VMs: list them, show one, read its serial console",
		Long: `Each subcommand sends a small signed job pinned to NODE (signed with your
key, like writ run) and prints what the node's VM layer reports.`,
	}
	ls := &cobra.Command{
		Use:   "ls NODE",
		Short: "List the VMs of a node",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.Run(cmd.Context(), append([]string{"ls"}, args...))
		},
	}
	info := &cobra.Command{
		Use:   "info NODE VM",
		Short: "Show one VM: state, pid, restarts, last error, spec",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.Run(cmd.Context(), append([]string{"info"}, args...))
		},
	}
	console := &cobra.Command{
		Use:     "console NODE VM",
		Short:   "Print the end of a VM's serial console",
		Args:    cobra.ExactArgs(2),
		Example: "  writ vm console n1 web --bytes 8192",
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.Run(cmd.Context(), append([]string{"console"}, args...))
		},
	}
	stopOwner := &cobra.Command{
		Use:   "stop-owner USER NODE...",
		Short: "Stop every VM of USER on the nodes and remove its port forwards",
		Long: `Sends owner_stop.tengo to each NODE: it stops every VM USER owns there and
removes the port forwards of USER's networks, so nothing of USER stays
running or reachable. Volumes, networks and VM records stay for inspection.
Run it as a site admin after disabling a user (writ user disable USER):
disabling refuses the user's new jobs, this stops what already runs.
writ node ls lists the site's nodes.`,
		Example: "  writ user disable mallory\n  writ node ls --site lab\n  writ vm stop-owner mallory n3f1c0ffee0123456789a n77aa55bb0123456789ab",
		Args:    cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.stopOwner(cmd.Context(), args[0], args[1:])
		},
	}
	console.Flags().IntVar(&c.bytes, "bytes", 16<<10, "how much of the console's end to print (at most 32 KiB)")
	ls.Flags().BoolVar(&c.json, "json", false, "print JSON")
	for _, sub := range []*cobra.Command{ls, info, console, stopOwner} {
		c.signFlags.addSigning(sub)
		coordFlag(sub, &c.coord)
		cmd.AddCommand(sub)
	}
	return cmd
}

// Run runs one of ls, info or console: args are the subcommand, the node
// and, but for ls, the VM.
func (c *vmCmd) Run(ctx context.Context, args []string) error {
	c.node = args[1]
	var name string
	jobArgs := map[string]any{}
	switch args[0] {
	case "ls":
		name = "vm_list.tengo"
	case "info":
		name, jobArgs["name"] = "vm_info.tengo", args[2]
	case "console":
		name, jobArgs["name"], jobArgs["bytes"] = "vm_console.tengo", args[2], c.bytes
	default:
		return fmt.Errorf("writ vm: unknown subcommand %q", args[0])
	}
	script, err := scripts.Library(name)
	if err != nil {
		return err
	}
	for k, v := range jobArgs {
		b, _ := json.Marshal(v)
		c.args = append(c.args, k+"="+string(b))
	}
	last, err := c.runOn(ctx, "vm-"+args[0], script)
	if err != nil {
		return err
	}
	if last.Type != job.EventSucceeded {
		return &exitError{code: 1}
	}
	switch {
	case args[0] == "console":
		var text string
		if err := json.Unmarshal(last.Result, &text); err != nil {
			return err
		}
		fmt.Print(text)
	case args[0] == "ls" && !c.json:
		var vms []struct {
			Name      string    `json:"name"`
			Owner     string    `json:"owner"`
			State     string    `json:"state"`
			Pid       int       `json:"pid"`
			Restarts  int       `json:"restarts"`
			StartedAt time.Time `json:"started_at"`
			Spec      struct {
				CPUs      int `json:"cpus"`
				MemoryMiB int `json:"memory_mib"`
			} `json:"spec"`
		}
		if err := json.Unmarshal(last.Result, &vms); err != nil {
			return err
		}
		w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "NAME\tOWNER\tSTATE\tPID\tCPUS\tMEMORY\tRESTARTS\tUP SINCE")
		for _, v := range vms {
			since := ""
			if v.State == "running" && !v.StartedAt.IsZero() {
				since = v.StartedAt.Local().Format(time.DateTime)
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%d MiB\t%d\t%s\n", v.Name, v.Owner, v.State, pidText(v.Pid), v.Spec.CPUs, v.Spec.MemoryMiB, v.Restarts, since)
		}
		return w.Flush()
	default:
		os.Stdout.Write(append(prettyJSON(last.Result), '\n'))
	}
	return nil
}

// runOn signs script as job name, pinned to c.node, submits it, follows it
// to its end and returns its last event.
func (c *vmCmd) runOn(ctx context.Context, name, script string) (job.Event, error) {
	env, err := c.signSource(name, script)
	if err != nil {
		return job.Event{}, err
	}
	cl, err := newCoordClient(c.coord, c.key, nil, c.ca.path())
	if err != nil {
		return job.Event{}, err
	}
	id, err := submit(ctx, cl, env)
	if err != nil {
		return job.Event{}, err
	}
	return follow(ctx, cl, id, false)
}

// stopOwner runs owner_stop.tengo on each node, one after another, and
// fails if any node could not stop everything.
func (c *vmCmd) stopOwner(ctx context.Context, owner string, nodes []string) error {
	script, err := scripts.Library("owner_stop.tengo")
	if err != nil {
		return err
	}
	b, _ := json.Marshal(owner)
	c.args = append(c.args, "owner="+string(b))
	failed := 0
	for _, node := range nodes {
		c.node = node
		last, err := c.runOn(ctx, "vm-stop-owner", script)
		if err != nil {
			return err
		}
		var res struct {
			Stopped     []string          `json:"stopped"`
			Unforwarded []string          `json:"unforwarded"`
			Failed      []json.RawMessage `json:"failed"`
		}
		if last.Type != job.EventSucceeded || json.Unmarshal(last.Result, &res) != nil {
			failed++
			continue
		}
		fmt.Printf("%s: stopped %d VMs of %s %v, removed %d forwards %v\n", node, len(res.Stopped), owner, res.Stopped, len(res.Unforwarded), res.Unforwarded)
		if len(res.Failed) > 0 {
			failed++
			fmt.Printf("%s: could not stop: %s\n", node, prettyJSON(last.Result))
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d nodes did not stop everything of %s", failed, len(nodes), owner)
	}
	return nil
}

func pidText(pid int) string {
	if pid == 0 {
		return "-"
	}
	return strconv.Itoa(pid)
}

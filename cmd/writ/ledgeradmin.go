package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/ledger"
)

// ledgerCall is a small ledger subcommand: a call through a client (signed
// by an admin's key when signed is set).
type ledgerCall struct {
	adminFlags
	signed bool
	run    func(ctx context.Context, cl *ledger.Client, args []string) error
}

// Run makes the call.
func (c *ledgerCall) Run(ctx context.Context, args []string) error {
	cl, err := c.client(c.signed)
	if err != nil {
		return err
	}
	return c.run(ctx, cl, args)
}

func newLedgerCall(use, short string, args cobra.PositionalArgs, signed bool, run func(ctx context.Context, cl *ledger.Client, args []string) error) (*cobra.Command, *ledgerCall) {
	c := &ledgerCall{signed: signed, run: run}
	cmd := &cobra.Command{Use: use, Short: short, Args: args,
		RunE: func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) }}
	c.add(cmd)
	return cmd, c
}

func readPubKey(path string) (string, error) {
	if path == "" {
		return "", fmt.Errorf("--pubkey is required: an OpenSSH .pub file")
	}
	b, err := os.ReadFile(path)
	return strings.TrimSpace(string(b)), err
}

// userKeyCommands are add-key, rotate-key, disable, enable and role.
func userKeyCommands() []*cobra.Command {
	var pub, rotPub string
	addKey, _ := newLedgerCall("add-key NAME", "Add a public key to a user", cobra.ExactArgs(1), true, func(ctx context.Context, cl *ledger.Client, a []string) error {
		line, err := readPubKey(pub)
		if err != nil {
			return err
		}
		k, err := cl.AddKey(ctx, a[0], line)
		if err == nil {
			printJSON(k)
		}
		return err
	})
	addKey.Flags().StringVar(&pub, "pubkey", "", "public key file (OpenSSH .pub)")
	rotate, _ := newLedgerCall("rotate-key NAME OLD-KEYID", "Replace a user's key: add the new one, then revoke the old", cobra.ExactArgs(2), true, func(ctx context.Context, cl *ledger.Client, a []string) error {
		line, err := readPubKey(rotPub)
		if err != nil {
			return err
		}
		u, err := cl.RotateKey(ctx, a[0], a[1], line)
		if err == nil {
			printJSON(u)
		}
		return err
	})
	rotate.Flags().StringVar(&rotPub, "pubkey", "", "the new public key file (OpenSSH .pub)")
	var out []*cobra.Command
	out = append(out, addKey, rotate)
	for _, disabled := range []bool{true, false} {
		verb := map[bool]string{true: "disable", false: "enable"}[disabled]
		c, _ := newLedgerCall(verb+" NAME", strings.ToUpper(verb[:1])+verb[1:]+" a user (a disabled user's keys sign nothing)", cobra.ExactArgs(1), true, func(ctx context.Context, cl *ledger.Client, a []string) error {
			u, err := cl.SetDisabled(ctx, a[0], disabled)
			if err == nil {
				fmt.Printf("user %s %sd\n", u.Name, verb)
				if disabled {
					fmt.Printf("its new jobs are refused; what it already runs keeps running: stop it with\n  writ vm stop-owner %s NODE... (writ node ls --site SITE lists the nodes)\n", u.Name)
				}
			}
			return err
		})
		out = append(out, c)
	}
	role, _ := newLedgerCall("role NAME SITE ROLE", "Bind a user's role on a site (admin, deployer, viewer; \"\" removes it; SITE * for all)", cobra.ExactArgs(3), true, func(ctx context.Context, cl *ledger.Client, a []string) error {
		return cl.SetRole(ctx, a[0], a[1], a[2])
	})
	return append(out, role)
}

// siteTokenCommand is `writ site token create|ls|revoke`.
func siteTokenCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Enrollment tokens: what a new node presents to register with a site"}
	var ttl time.Duration
	var uses int64
	create, _ := newLedgerCall("create SITE", "Create an enrollment token; its secret is printed once", cobra.ExactArgs(1), true, func(ctx context.Context, cl *ledger.Client, a []string) error {
		t, err := cl.CreateTokenFor(ctx, a[0], ledger.CreateTokenRequest{TTL: ledger.Seconds(ttl / time.Second), Uses: uses})
		if err != nil {
			return err
		}
		fmt.Printf("token %s for site %s, enrolls %d node(s) until %s\nsecret (shown once; give it to the node as $WRIT_TOKEN):\n%s\n", t.ID, t.Site, t.MaxUses, t.ExpiresAt.Local().Format(time.DateTime), t.Secret)
		return nil
	})
	create.Flags().DurationVar(&ttl, "ttl", ledger.DefaultTokenTTL, "how long the token may enroll nodes")
	create.Flags().Int64Var(&uses, "uses", 1, fmt.Sprintf("how many nodes it may enroll (at most %d); a registered node registering again uses none", ledger.MaxTokenUses))
	ls, _ := newLedgerCall("ls SITE", "List a site's tokens", cobra.ExactArgs(1), false, func(ctx context.Context, cl *ledger.Client, a []string) error {
		list, err := cl.Tokens(ctx, a[0])
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "TOKEN\tCREATED BY\tEXPIRES\tUSES\tSTATE")
		now := time.Now()
		for _, t := range list {
			state := "live"
			switch {
			case t.RevokedAt != nil:
				state = "revoked"
			case !now.Before(t.ExpiresAt):
				state = "expired"
			case !t.Live(now):
				state = "used up"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d\t%s\n", t.ID, t.CreatedBy, t.ExpiresAt.Local().Format(time.DateTime), t.Uses, t.MaxUses, state)
		}
		return tw.Flush()
	})
	revoke, _ := newLedgerCall("revoke SITE TOKEN-ID", "Revoke a token", cobra.ExactArgs(2), true, func(ctx context.Context, cl *ledger.Client, a []string) error {
		t, err := cl.RevokeToken(ctx, a[0], a[1])
		if err == nil {
			fmt.Printf("token %s revoked\n", t.ID)
		}
		return err
	})
	cmd.AddCommand(create, ls, revoke)
	return cmd
}

// nodeListCommands are `writ node ls` and `writ node info`.
func nodeListCommands() []*cobra.Command {
	var site string
	ls, _ := newLedgerCall("ls", "List registered nodes with their liveness and capacity", cobra.NoArgs, false, func(ctx context.Context, cl *ledger.Client, _ []string) error {
		nodes, err := cl.Nodes(ctx, site)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NODE\tSITE\tHOST\tLIVENESS\tCPUS\tMEMORY\tUSED\tUPTIME\tBOOTS")
		for _, n := range nodes {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d MiB\t%d cpu %d MiB\t%s\t%d\n", n.ID, n.Site, n.Facts.Hostname, n.Liveness,
				n.Capacity.CPUs, n.Capacity.MemoryMiB, n.Used.CPUs, n.Used.MemoryMiB, time.Duration(n.UptimeSeconds)*time.Second, n.Boots)
		}
		return tw.Flush()
	})
	ls.Flags().StringVar(&site, "site", "", "only the nodes of this site")
	info, _ := newLedgerCall("info NODE", "Show one node: facts, capacity, last report, liveness", cobra.ExactArgs(1), false, func(ctx context.Context, cl *ledger.Client, a []string) error {
		n, err := cl.Node(ctx, a[0])
		if err == nil {
			printJSON(n)
		}
		return err
	})
	revoke, _ := newLedgerCall("revoke NODE", "Revoke a node: it never registers, reports or runs jobs again (replace it with a new key and token)", cobra.ExactArgs(1), true, func(ctx context.Context, cl *ledger.Client, a []string) error {
		n, err := cl.RevokeNode(ctx, a[0])
		if err == nil {
			fmt.Printf("node %s revoked; its runner stops taking jobs within the trust TTL\n", n.ID)
		}
		return err
	})
	return []*cobra.Command{ls, info, revoke}
}

// ledgerAuditCommand is `writ ledger audit`.
func ledgerAuditCommand() *cobra.Command {
	cmd, _ := newLedgerCall("audit", "Show the newest admin writes: who did what, when", cobra.NoArgs, true, func(ctx context.Context, cl *ledger.Client, _ []string) error {
		entries, err := cl.Audit(ctx)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "WHEN\tWHO\tWHAT\tTARGET\tDETAIL")
		for _, e := range entries {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", e.At.Local().Format(time.DateTime), e.Actor, e.Op, e.Target, e.Detail)
		}
		return tw.Flush()
	})
	return cmd
}

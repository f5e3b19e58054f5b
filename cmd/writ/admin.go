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

// adminFlags are what every ledger admin command needs.
type adminFlags struct {
	ledger, key string
	ca          caSource
}

func (f *adminFlags) add(cmd *cobra.Command) {
	f.ca.cmd = cmd
	cmd.Flags().StringVar(&f.ledger, "ledger", envOr(envLedger, serviceURL(defaultLedgerAddr)), "ledger URL, or several ledger processes' URLs separated by commas (default $WRIT_LEDGER)")
	cmd.Flags().StringVar(&f.key, "key", "", "an admin's signing key (default $WRIT_KEY)")
}

func (f *adminFlags) client(signed bool) (*ledger.Client, error) {
	s, err := clientSec(f.ca.path())
	if err != nil {
		return nil, err
	}
	if err := s.checkURL(f.ledger, "--ledger"); err != nil {
		return nil, err
	}
	c := s.ledgerClient(f.ledger)
	if signed {
		k, err := loadKey(f.key)
		if err != nil {
			return nil, err
		}
		c.Key = k
	}
	return c, nil
}

func userCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "user", Short: "Manage ledger users, their keys and roles (admin)"}
	cmd.AddCommand(userAddCommand(), userListCommand(), userRevokeKeyCommand())
	cmd.AddCommand(userKeyCommands()...)
	return cmd
}

type userAddCmd struct {
	adminFlags
	pubKeys, roles []string
}

func userAddCommand() *cobra.Command {
	c := &userAddCmd{}
	cmd := &cobra.Command{
		Use:     "add NAME",
		Short:   "Create a user with public keys and roles",
		Example: `  writ user add alice --pubkey alice.pub --role local=deployer`,
		Args:    cobra.ExactArgs(1),
		RunE:    func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.add(cmd)
	cmd.Flags().StringArrayVar(&c.pubKeys, "pubkey", nil, "public key file (OpenSSH .pub); repeatable")
	cmd.Flags().StringArrayVar(&c.roles, "role", nil, "SITE=ROLE (roles: admin, deployer, viewer; SITE * for all); repeatable")
	return cmd
}

// Run creates the user.
func (c *userAddCmd) Run(ctx context.Context, args []string) error {
	req := ledger.CreateUserRequest{Name: args[0], Roles: map[string]string{}}
	for _, p := range c.pubKeys {
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		req.PublicKeys = append(req.PublicKeys, strings.TrimSpace(string(b)))
	}
	for _, r := range c.roles {
		site, role, ok := strings.Cut(r, "=")
		if !ok {
			return fmt.Errorf("--role %q: want SITE=ROLE", r)
		}
		req.Roles[site] = role
	}
	cl, err := c.client(true)
	if err != nil {
		return err
	}
	u, err := cl.CreateUser(ctx, req)
	if err != nil {
		return err
	}
	printJSON(u)
	return nil
}

type userListCmd struct{ adminFlags }

func userListCommand() *cobra.Command {
	c := &userListCmd{}
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List users with their roles and keys",
		Args:  cobra.NoArgs,
		RunE:  func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.add(cmd)
	return cmd
}

// Run lists users.
func (c *userListCmd) Run(ctx context.Context, _ []string) error {
	cl, err := c.client(false)
	if err != nil {
		return err
	}
	users, err := cl.Users(ctx)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "USER\tROLES\tKEY\tREVOKED")
	for _, u := range users {
		var roles []string
		for s, r := range u.Roles {
			roles = append(roles, s+"="+r)
		}
		for i, k := range u.Keys {
			name, rs := u.Name, strings.Join(roles, ",")
			if i > 0 {
				name, rs = "", ""
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%v\n", name, rs, k.ID, k.RevokedAt != nil)
		}
		if len(u.Keys) == 0 {
			fmt.Fprintf(tw, "%s\t%s\t-\t-\n", u.Name, strings.Join(roles, ","))
		}
	}
	return tw.Flush()
}

type userRevokeKeyCmd struct{ adminFlags }

func userRevokeKeyCommand() *cobra.Command {
	c := &userRevokeKeyCmd{}
	cmd := &cobra.Command{
		Use:   "revoke-key KEYID",
		Short: "Revoke a key: verifiers stop accepting it within their cache TTL (10 s)",
		Args:  cobra.ExactArgs(1),
		RunE:  func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.add(cmd)
	return cmd
}

// Run revokes the key.
func (c *userRevokeKeyCmd) Run(ctx context.Context, args []string) error {
	cl, err := c.client(true)
	if err != nil {
		return err
	}
	if err := cl.RevokeKey(ctx, args[0]); err != nil {
		return err
	}
	fmt.Printf("key %s revoked\n", args[0])
	return nil
}

func siteCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "site", Short: "Manage sites: supervisor address and signing policy (admin)"}
	cmd.AddCommand(siteSetCommand(), siteListCommand(), siteTokenCommand())
	return cmd
}

type siteSetCmd struct {
	adminFlags
	supervisor string
	roles      []string
	threshold  int
	interval   time.Duration
	memory     string
}

func siteSetCommand() *cobra.Command {
	c := &siteSetCmd{}
	cmd := &cobra.Command{
		Use:     "set NAME",
		Short:   "Create or update a site",
		Example: `  writ site set lab --supervisor https://10.0.1.1:7703 --threshold 2 --roles admin,deployer`,
		Args:    cobra.ExactArgs(1),
		RunE:    func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.add(cmd)
	cmd.Flags().StringVar(&c.supervisor, "supervisor", "", "the site supervisor's URL (required)")
	cmd.Flags().StringSliceVar(&c.roles, "roles", ledger.DefaultPolicyRoles, "roles that may sign jobs for the site")
	cmd.Flags().IntVar(&c.threshold, "threshold", 1, "signatures from distinct users a job needs")
	cmd.Flags().DurationVar(&c.interval, "uptime-interval", ledger.DefaultUptimeInterval, "how often the site's nodes report uptime (liveness: online within 2, stale within 5)")
	cmd.Flags().StringVar(&c.memory, "script-memory", "", `the most memory one job's script may hold on the site's nodes, e.g. 128M ("": each runner's own --script-memory, which also caps this)`)
	return cmd
}

// Run puts the site.
func (c *siteSetCmd) Run(ctx context.Context, args []string) error {
	cl, err := c.client(true)
	if err != nil {
		return err
	}
	memory, err := parseSizeFlag(c.memory, "--script-memory")
	if err != nil {
		return err
	}
	s := ledger.Site{Name: args[0], SupervisorURL: c.supervisor, Policy: ledger.Policy{Roles: c.roles, Threshold: c.threshold}, UptimeInterval: ledger.Seconds(c.interval / time.Second), ScriptMemory: memory}
	if err := ledger.ValidateSite(s); err != nil {
		return err
	}
	if err := cl.PutSite(ctx, s); err != nil {
		return err
	}
	printJSON(s)
	return nil
}

type siteListCmd struct{ adminFlags }

func siteListCommand() *cobra.Command {
	c := &siteListCmd{}
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List sites",
		Args:  cobra.NoArgs,
		RunE:  func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	c.add(cmd)
	return cmd
}

// Run lists sites.
func (c *siteListCmd) Run(ctx context.Context, _ []string) error {
	cl, err := c.client(false)
	if err != nil {
		return err
	}
	sites, err := cl.Sites(ctx)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SITE\tSUPERVISOR\tTHRESHOLD\tROLES")
	for _, s := range sites {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", s.Name, s.SupervisorURL, s.Policy.Threshold, strings.Join(s.Policy.Roles, ","))
	}
	return tw.Flush()
}

package main

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/ledger/store/postgres"
	"github.com/writ-fleet/writ/ledger/store/sqlite"
	"github.com/writ-fleet/writ/ledger/store/sqlstore"
)

func ledgerCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ledger",
		Short: "Create and serve the ledger: users, keys, roles and sites",
	}
	cmd.AddCommand(ledgerInitCommand(), ledgerServeCommand(), ledgerAuditCommand())
	return cmd
}

type ledgerInitCmd struct {
	db, adminName, adminKey, site, supervisorURL string
	threshold                                    int
}

func ledgerInitCommand() *cobra.Command {
	c := &ledgerInitCmd{}
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create the ledger store with its first admin (and optionally a first site)",
		Example: `  writ key gen
  writ ledger init --db /var/lib/writ/ledger.db --admin-key ~/.config/writ/key.pub \
      --site lab --supervisor https://10.0.1.1:7703`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	cmd.Flags().StringVar(&c.db, "db", "ledger.db", "the ledger's store: a SQLite file, or postgres://…")
	cmd.Flags().StringVar(&c.adminName, "admin-name", "admin", "name of the first admin user")
	cmd.Flags().StringVar(&c.adminKey, "admin-key", "", "the first admin's public key file (OpenSSH .pub) (required)")
	cmd.Flags().StringVar(&c.site, "site", "", "also create this site")
	cmd.Flags().StringVar(&c.supervisorURL, "supervisor", serviceURL(defaultSupervisorAddr), "supervisor URL of --site")
	cmd.Flags().IntVar(&c.threshold, "threshold", 1, "signatures from distinct users that --site requires")
	return cmd
}

// Run creates the store.
func (c *ledgerInitCmd) Run(ctx context.Context, _ []string) error {
	if c.adminKey == "" {
		return errors.New("--admin-key is required: the public key file of the first admin")
	}
	pub, err := os.ReadFile(c.adminKey)
	if err != nil {
		return err
	}
	store, err := openStore(ctx, c.db)
	if err != nil {
		return err
	}
	defer store.Close()
	var site *ledger.Site
	if c.site != "" {
		site = &ledger.Site{Name: c.site, SupervisorURL: c.supervisorURL, Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: c.threshold}}
	}
	if err := ledger.Init(ctx, store, c.adminName, string(pub), site); err != nil {
		return err
	}
	fmt.Printf("ledger %s created with admin %s\n", c.db, c.adminName)
	return nil
}

type ledgerServeCmd struct {
	db, listen  string
	authorities []string
	regRate     float64
	tls         serviceTLS
	log         *slog.Logger
}

func ledgerServeCommand() *cobra.Command {
	c := &ledgerServeCmd{}
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve the ledger API",
		Long: `Serve the ledger's HTTP API: public reads of sites, users and keys (and
the per-site trust snapshots verifiers cache), and admin writes signed with
RFC 9421 HTTP Message Signatures by an admin's key.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c.log = newLogger(cmd)
			return c.Run(cmd.Context(), args)
		},
	}
	cmd.Flags().StringVar(&c.db, "db", "ledger.db", "the ledger's store: a SQLite file, or postgres://… (create it with `writ ledger init`)")
	cmd.Flags().StringVar(&c.listen, "listen", defaultLedgerAddr, "address to serve the ledger API on")
	c.tls.add(cmd)
	cmd.Flags().Float64Var(&c.regRate, "register-rate", 5, "registrations per second one address may make (a fleet enrolling from behind one NAT may need more; 0: no limit)")
	cmd.Flags().StringSliceVar(&c.authorities, "authority", nil, "names (host or host:port) signed requests must be addressed to (default: the certificate's DNS names and IP addresses)")
	return cmd
}

// Run serves the ledger until ctx ends.
func (c *ledgerServeCmd) Run(ctx context.Context, _ []string) error {
	if !isPostgresURL(c.db) {
		if _, err := os.Stat(c.db); err != nil {
			return fmt.Errorf("ledger store %s: %w (create it with `writ ledger init`)", c.db, err)
		}
	}
	s, err := c.tls.load(true)
	if err != nil {
		return err
	}
	store, err := openStore(ctx, c.db)
	if err != nil {
		return err
	}
	defer store.Close()
	ln, err := s.listen(c.listen, "--listen")
	if err != nil {
		return err
	}
	rate := c.regRate
	if rate == 0 {
		rate = -1 // no limit
	}
	return runLedger(ctx, c.log, ln, store, s, c.authorities, rate)
}

func runLedger(ctx context.Context, log *slog.Logger, ln net.Listener, store ledger.Store, s *sec, authorities []string, registerRate float64) error {
	srv := ledger.NewServer(store, log.With("svc", "ledger"), newRegistry(), nil)
	if s.tls() {
		cert := s.cfg.Certificate()
		if len(authorities) == 0 {
			authorities = s.authorities()
		}
		if s.name() != ledger.DefaultLedgerName {
			log.Warn("the ledger's certificate is not named "+ledger.DefaultLedgerName+": verifiers will refuse its trust snapshots", "name", s.name())
		}
		srv.SignTrust(&ledger.TrustSigner{Key: cert.PrivateKey.(crypto.Signer), Cert: cert.Certificate[0]})
	}
	srv.Harden(ledger.ServerOptions{Authorities: authorities, RegisterRate: registerRate})
	log.Info("ledger listening", "addr", ln.Addr().String(), "tls", s.tls(), "authorities", authorities)
	return serve(ctx, ln, srv.Handler())
}

// openStore opens the ledger store named by db: a postgres:// or
// postgresql:// URL, or else a SQLite file.
func openStore(ctx context.Context, db string) (*sqlstore.Store, error) {
	if isPostgresURL(db) {
		return postgres.Open(ctx, db)
	}
	return sqlite.Open(ctx, db)
}

func isPostgresURL(db string) bool {
	return strings.HasPrefix(db, "postgres://") || strings.HasPrefix(db, "postgresql://")
}

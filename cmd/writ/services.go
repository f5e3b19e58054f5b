package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/httpapi"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/ledger/store/sqlite"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/runner"
	"github.com/writ-fleet/writ/scripts"
	"github.com/writ-fleet/writ/supervisor"
)

func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// ---- coord ----

type coordCmd struct {
	listen, redis, ledger string
	log                   *slog.Logger
}

func coordCommand() *cobra.Command {
	c := &coordCmd{}
	cmd := &cobra.Command{
		Use:   "coord",
		Short: "Run coord, the front door that accepts signed jobs and routes them to sites",
		Long: `coord accepts signed jobs over HTTP (POST /v1/jobs), checks them early,
forwards each to its site's supervisor (address from the ledger), and keeps
every job's state in its Redis by following the sites' event streams. It is
stateless apart from Redis: restart it, or run several behind a load balancer.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c.log = newLogger(cmd)
			return c.Run(cmd.Context(), args)
		},
	}
	cmd.Flags().StringVar(&c.listen, "listen", defaultCoordAddr, "address to serve the coord API on")
	cmd.Flags().StringVar(&c.redis, "redis", defaultRedisURL, "coord's Redis, as redis://[:password@]host:port/db")
	cmd.Flags().StringVar(&c.ledger, "ledger", envOr(envLedger, httpURL(defaultLedgerAddr)), "ledger URL")
	return cmd
}

// Run serves coord until ctx ends.
func (c *coordCmd) Run(ctx context.Context, _ []string) error {
	ln, err := listen(c.listen, "--listen")
	if err != nil {
		return err
	}
	rdb, err := queue.Connect(c.redis)
	if err != nil {
		return err
	}
	defer rdb.Close()
	return runCoord(ctx, c.log, ln, rdb, c.ledger)
}

func runCoord(ctx context.Context, log *slog.Logger, ln net.Listener, rdb *queue.Redis, ledgerURL string) error {
	lc := &ledger.Client{BaseURL: ledgerURL}
	co, err := coord.New(coord.Params{Redis: rdb, Ledger: lc, Trust: &ledger.TrustCache{Client: lc}, Log: log.With("svc", "coord"), Metrics: newRegistry()})
	if err != nil {
		return err
	}
	log.Info("coord listening", "addr", ln.Addr().String(), "redis", rdb.URL(), "ledger", ledgerURL)
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return co.Run(ctx) })
	g.Go(func() error { return serve(ctx, ln, co.Handler()) })
	return g.Wait()
}

// ---- supervisor ----

type supervisorCmd struct {
	site, listen, redis, ledger string
	trustTTL                    time.Duration
	log                         *slog.Logger
}

func supervisorCommand() *cobra.Command {
	c := &supervisorCmd{}
	cmd := &cobra.Command{
		Use:   "supervisor",
		Short: "Run the supervisor of one site: verify, validate and enqueue jobs",
		Long: `The supervisor of a site verifies every job's signatures against the ledger
and the site's signing policy, checks its validity window, refuses replays,
compiles its script, and enqueues it in the site's Redis for the runners. It
also serves the site's job events to coord (GET /v1/events).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c.log = newLogger(cmd)
			return c.Run(cmd.Context(), args)
		},
	}
	cmd.Flags().StringVar(&c.site, "site", "", "the site this supervisor serves (required)")
	cmd.Flags().StringVar(&c.listen, "listen", defaultSupervisorAddr, "address to serve the supervisor API on")
	cmd.Flags().StringVar(&c.redis, "redis", defaultRedisURL, "the site's Redis")
	cmd.Flags().StringVar(&c.ledger, "ledger", envOr(envLedger, httpURL(defaultLedgerAddr)), "ledger URL")
	trustTTLFlag(cmd, &c.trustTTL)
	return cmd
}

func trustTTLFlag(cmd *cobra.Command, dst *time.Duration) {
	cmd.Flags().DurationVar(dst, "trust-ttl", ledger.DefaultTrustTTL, "how long ledger keys and policies are cached: a revoked key stops working within this time")
}

// Run serves the supervisor until ctx ends.
func (c *supervisorCmd) Run(ctx context.Context, _ []string) error {
	if !envelope.ValidSite(c.site) {
		return fmt.Errorf("--site %q is missing or not a valid site name", c.site)
	}
	ln, err := listen(c.listen, "--listen")
	if err != nil {
		return err
	}
	rdb, err := queue.Connect(c.redis)
	if err != nil {
		return err
	}
	defer rdb.Close()
	return runSupervisor(ctx, c.log, ln, rdb, c.ledger, c.site, c.trustTTL)
}

func runSupervisor(ctx context.Context, log *slog.Logger, ln net.Listener, rdb *queue.Redis, ledgerURL, site string, trustTTL time.Duration) error {
	sup, err := supervisor.New(supervisor.Params{
		Site:    site,
		Trust:   &ledger.TrustCache{Client: &ledger.Client{BaseURL: ledgerURL}, TTL: trustTTL},
		Redis:   rdb,
		Scripts: scripts.New(scripts.Config{}, nil),
		Log:     log.With("svc", "supervisor", "site", site),
		Metrics: newRegistry(),
	})
	if err != nil {
		return err
	}
	log.Info("supervisor listening", "site", site, "addr", ln.Addr().String(), "redis", rdb.URL())
	return serve(ctx, ln, sup.Handler())
}

// ---- runner ----

type runnerCmd struct {
	site, node, redis, ledger, listen string
	concurrency                       int
	poll, trustTTL                    time.Duration
	log                               *slog.Logger
}

func runnerCommand() *cobra.Command {
	c := &runnerCmd{}
	cmd := &cobra.Command{
		Use:   "runner",
		Short: "Run a runner: take jobs of a site and of this node from Redis and run them",
		Long: `A runner takes jobs from its site's queue and its own node's queue, verifies
each signed envelope again, runs the script in a sandbox (deadline, allocation
cap, bounded logs and result) and reports events. Run one on every node; more
runners, more capacity. It serves /healthz, /readyz and /metrics on --listen.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c.log = newLogger(cmd)
			return c.Run(cmd.Context(), args)
		},
	}
	cmd.Flags().StringVar(&c.site, "site", "", "the site whose jobs to run (required)")
	cmd.Flags().StringVar(&c.node, "node", defaultNodeID(), "this node's ID (its own queue is node:<ID>)")
	cmd.Flags().StringVar(&c.redis, "redis", defaultRedisURL, "the site's Redis")
	cmd.Flags().StringVar(&c.ledger, "ledger", envOr(envLedger, httpURL(defaultLedgerAddr)), "ledger URL")
	cmd.Flags().StringVar(&c.listen, "listen", defaultRunnerAddr, `address for /healthz, /readyz and /metrics ("" to turn off)`)
	cmd.Flags().IntVar(&c.concurrency, "concurrency", runner.DefaultConcurrency, "jobs run at once")
	cmd.Flags().DurationVar(&c.poll, "poll", queue.DefaultPollInterval, "how often an idle runner asks Redis for work")
	trustTTLFlag(cmd, &c.trustTTL)
	return cmd
}

// Run runs the runner until ctx ends.
func (c *runnerCmd) Run(ctx context.Context, _ []string) error {
	if !envelope.ValidSite(c.site) {
		return fmt.Errorf("--site %q is missing or not a valid site name", c.site)
	}
	if !envelope.ValidNode(c.node) {
		return fmt.Errorf("--node %q is not a valid node ID", c.node)
	}
	if c.concurrency < 1 {
		return errors.New("--concurrency must be at least 1")
	}
	var ln net.Listener
	if c.listen != "" {
		var err error
		if ln, err = listen(c.listen, "--listen"); err != nil {
			return err
		}
	}
	rdb, err := queue.Connect(c.redis)
	if err != nil {
		return err
	}
	defer rdb.Close()
	return runRunner(ctx, c.log, ln, rdb, c.ledger, c.site, c.node, c.concurrency, c.poll, c.trustTTL)
}

func runRunner(ctx context.Context, log *slog.Logger, ln net.Listener, rdb *queue.Redis, ledgerURL, site, node string, concurrency int, poll, trustTTL time.Duration) error {
	run, err := runner.New(runner.Params{
		Site: site, Node: node, Redis: rdb,
		Trust:        &ledger.TrustCache{Client: &ledger.Client{BaseURL: ledgerURL}, TTL: trustTTL},
		Scripts:      scripts.New(scripts.Config{}, nil),
		Log:          log.With("svc", "runner", "site", site, "node", node),
		Metrics:      newRegistry(),
		Concurrency:  concurrency,
		PollInterval: poll,
	})
	if err != nil {
		return err
	}
	if err := rdb.WaitReady(ctx); err != nil {
		return err
	}
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return run.Run(ctx) })
	if ln != nil {
		r := chi.NewRouter()
		httpapi.Ops(r, run.Metrics(), run.Ready)
		g.Go(func() error { return serve(ctx, ln, r) })
	}
	return g.Wait()
}

// ---- ledger ----

func ledgerCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ledger",
		Short: "Create and serve the ledger: users, keys, roles and sites",
	}
	cmd.AddCommand(ledgerInitCommand(), ledgerServeCommand())
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
      --site local --supervisor http://127.0.0.1:7703`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return c.Run(cmd.Context(), args) },
	}
	cmd.Flags().StringVar(&c.db, "db", "ledger.db", "SQLite file of the ledger")
	cmd.Flags().StringVar(&c.adminName, "admin-name", "admin", "name of the first admin user")
	cmd.Flags().StringVar(&c.adminKey, "admin-key", "", "the first admin's public key file (OpenSSH .pub) (required)")
	cmd.Flags().StringVar(&c.site, "site", "", "also create this site")
	cmd.Flags().StringVar(&c.supervisorURL, "supervisor", httpURL(defaultSupervisorAddr), "supervisor URL of --site")
	cmd.Flags().IntVar(&c.threshold, "threshold", 1, "signatures from distinct users that --site requires")
	return cmd
}

// Run creates the store.
func (c *ledgerInitCmd) Run(ctx context.Context, _ []string) error {
	if c.adminKey == "" {
		return errors.New("--admin-key is required: the public key file of the first admin")
	}
	pub, err := readFile(c.adminKey)
	if err != nil {
		return err
	}
	store, err := sqlite.Open(ctx, c.db)
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
	db, listen string
	log        *slog.Logger
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
	cmd.Flags().StringVar(&c.db, "db", "ledger.db", "SQLite file of the ledger (create it with `writ ledger init`)")
	cmd.Flags().StringVar(&c.listen, "listen", defaultLedgerAddr, "address to serve the ledger API on")
	return cmd
}

// Run serves the ledger until ctx ends.
func (c *ledgerServeCmd) Run(ctx context.Context, _ []string) error {
	if _, err := statFile(c.db); err != nil {
		return fmt.Errorf("ledger store %s: %w (create it with `writ ledger init`)", c.db, err)
	}
	store, err := sqlite.Open(ctx, c.db)
	if err != nil {
		return err
	}
	defer store.Close()
	ln, err := listen(c.listen, "--listen")
	if err != nil {
		return err
	}
	return runLedger(ctx, c.log, ln, store)
}

func runLedger(ctx context.Context, log *slog.Logger, ln net.Listener, store ledger.Store) error {
	srv := ledger.NewServer(store, log.With("svc", "ledger"), newRegistry(), nil)
	log.Info("ledger listening", "addr", ln.Addr().String())
	return serve(ctx, ln, srv.Handler())
}

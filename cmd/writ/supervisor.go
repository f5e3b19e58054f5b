package main

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/writ-fleet/writ/dispatch"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/scripts"
	"github.com/writ-fleet/writ/supervisor"
	"github.com/writ-fleet/writ/verify"
)

type supervisorCmd struct {
	site, listen, ledger string
	redis                redisFlags
	coordNames           []string
	dispatch             bool
	trustTTL             time.Duration
	tls                  serviceTLS
	log                  *slog.Logger
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
	c.redis.add(cmd, "the site's Redis")
	cmd.Flags().StringVar(&c.ledger, "ledger", envOr(envLedger, serviceURL(defaultLedgerAddr)), "ledger URL, or the URLs of several ledger processes separated by commas (a call goes to the next when one is down)")
	trustTTLFlag(cmd, &c.trustTTL)
	c.tls.add(cmd)
	cmd.Flags().BoolVar(&c.dispatch, "dispatch", false, "dispatch the site's jobs to its nodes over their own signed streams (writ node --supervisor): nodes then hold no Redis credential and cost the site's Redis nothing while idle")
	cmd.Flags().StringSliceVar(&c.coordNames, "coord-name", []string{supervisor.DefaultCoordName}, "certificate names of the coords that may submit jobs and read events (over TLS)")
	return cmd
}

// Run serves the supervisor until ctx ends.
func (c *supervisorCmd) Run(ctx context.Context, _ []string) error {
	if !envelope.ValidSite(c.site) {
		return fmt.Errorf("--site %q is missing or not a valid site name", c.site)
	}
	s, ln, rdb, err := serviceSetup(&c.tls, &c.redis, c.ledger, c.listen)
	if err != nil {
		return err
	}
	defer rdb.Close()
	return runSupervisor(ctx, c.log, ln, rdb, c.ledger, c.site, c.trustTTL, s, c.coordNames, c.dispatch)
}

func runSupervisor(ctx context.Context, log *slog.Logger, ln net.Listener, rdb *queue.Redis, ledgerURL, site string, trustTTL time.Duration, s *sec, coordNames []string, dispatched bool) error {
	trust := &ledger.TrustCache{Client: s.ledgerClient(ledgerURL), TTL: trustTTL}
	var disp *dispatch.Server
	if dispatched {
		disp = newDispatcher(rdb, s.ledgerClient(ledgerURL), trust, site, log)
		disp.Authorities = s.authorities()
	}
	sup, err := supervisor.New(supervisor.Params{
		Dispatch: disp,
		Site:     site,
		Coord:    coordNames,
		Trust:    trust,
		Redis:    rdb,
		Scripts:  scripts.New(scripts.Config{}, scripts.CheckModules()),
		Log:      log.With("svc", "supervisor", "site", site),
		Metrics:  newRegistry(),
	})
	if err != nil {
		return err
	}
	log.Info("supervisor listening", "site", site, "addr", ln.Addr().String(), "redis", rdb.URL())
	if disp != nil {
		g, gctx := errgroup.WithContext(ctx)
		g.Go(func() error { return disp.Run(gctx) })
		g.Go(func() error { return serve(gctx, ln, sup.Handler()) })
		return g.Wait()
	}
	return serve(ctx, ln, sup.Handler())
}

// newDispatcher is the site's dispatcher: nodes are the site's registered,
// unrevoked nodes of the ledger.
func newDispatcher(rdb *queue.Redis, lc *ledger.Client, trust *ledger.TrustCache, site string, log *slog.Logger) *dispatch.Server {
	return &dispatch.Server{Site: site, Redis: rdb, Log: log.With("svc", "dispatch", "site", site),
		// Revocation from the site's trust snapshot: one cached fetch for
		// every node's check.
		Revoked: func(ctx context.Context, id string) bool {
			t, err := trust.Get(ctx, site)
			return err == nil && t.NodeRevoked(id)
		},
		NodeKey: func(ctx context.Context, id string) (ed25519.PublicKey, error) {
			return verify.SiteNode(ctx, lc, trust, site, id)
		}}
}

package main

import (
	"context"
	"log/slog"
	"net"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
)

type coordCmd struct {
	authorities               []string
	listen, ledger, placement string
	streams                   int
	redis                     redisFlags
	tls                       serviceTLS
	log                       *slog.Logger
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
	c.redis.add(cmd, "coord's Redis")
	cmd.Flags().StringVar(&c.ledger, "ledger", envOr(envLedger, serviceURL(defaultLedgerAddr)), "ledger URL, or the URLs of several ledger processes separated by commas (a call goes to the next when one is down)")
	c.tls.add(cmd)
	cmd.Flags().StringSliceVar(&c.authorities, "authority", nil, "names (host or host:port) signed requests must be addressed to (default: the certificate's DNS names and IP addresses; give the load balancer's name when coord runs behind one)")
	cmd.Flags().IntVar(&c.streams, "streams-per-user", coord.DefaultStreamsPerUser, "event streams and waiting requests one user may hold open at once")
	cmd.Flags().StringVar(&c.placement, "placement", coord.PlaceSpread, "where jobs that state resources (--cpu/--memory) and pin no node go: spread (most free node) or binpack (fullest node that fits)")
	return cmd
}

// Run serves coord until ctx ends.
func (c *coordCmd) Run(ctx context.Context, _ []string) error {
	s, ln, rdb, err := serviceSetup(&c.tls, &c.redis, c.ledger, c.listen)
	if err != nil {
		return err
	}
	defer rdb.Close()
	return runCoord(ctx, c.log, ln, rdb, c.ledger, c.placement, s, c.streams, c.authorities)
}

func runCoord(ctx context.Context, log *slog.Logger, ln net.Listener, rdb *queue.Redis, ledgerURL, placement string, s *sec, streams int, authorities []string) error {
	lc := s.ledgerClient(ledgerURL)
	if len(authorities) == 0 {
		authorities = s.authorities()
	}
	co, err := coord.New(coord.Params{Redis: rdb, Ledger: lc, Trust: &ledger.TrustCache{Client: lc}, Log: log.With("svc", "coord"), Metrics: newRegistry(), Placement: placement,
		HTTP: s.client(0), StreamsPerUser: streams, Authorities: authorities})
	if err != nil {
		return err
	}
	log.Info("coord listening", "addr", ln.Addr().String(), "redis", rdb.URL(), "ledger", ledgerURL)
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return co.Run(ctx) })
	g.Go(func() error { return serve(ctx, ln, co.Handler()) })
	return g.Wait()
}

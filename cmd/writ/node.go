package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/writ-fleet/writ/dispatch"
	"github.com/writ-fleet/writ/identity"
	"github.com/writ-fleet/writ/internal/size"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/runner"
	"github.com/writ-fleet/writ/sal/vm"
	"github.com/writ-fleet/writ/seal"
)

// nodeCmd runs a node: its identity agent and its runner.
type nodeCmd struct {
	ledger, site, token, stateDir, listen string
	bootIDFile                            string
	redis                                 redisFlags
	supervisor                            string
	allowTmpfs                            bool
	concurrency, cpus                     int
	memory, scriptMemory                  string
	interval, trustTTL                    time.Duration
	status                                io.Writer // the status line; stderr by default
	tls                                   serviceTLS
	pool                                  poolFlags
	net                                   netFlags
	vm                                    vmFlags
	log                                   *slog.Logger
}

func nodeCommand() *cobra.Command {
	c := &nodeCmd{status: os.Stderr}
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Run a node: register with the ledger, report uptime, and run the site's jobs",
		Long: `Run this machine as a node of SITE. The first start makes the node's
ed25519 key in --state-dir (keep it on a disk: the key is the node's
identity, and its ID is derived from it) and registers with the ledger
using an enrollment token (writ site token create SITE). The node then
reports its uptime on the site's interval, and runs a runner that takes
the site's jobs and its own (queue node:<ID>). Stopping it (SIGTERM, a
planned reboot) sends a last uptime report first.

Reports the ledger does not take (it is down, or out of reach) wait in
--state-dir and go, oldest first, when it is back, after a reboot too:
the ledger counts every boot, those it never heard of live included. A
node that registered once starts reporting and running jobs at once,
whether or not the ledger answers.

As root the runner also manages this machine's networks and VMs (state
under --state-dir), like writ runner; --no-network --no-vm leave them alone.
Two nodes on one machine need a --state-dir each (each is its own key and
identity), and at most one of them may manage the networks and VMs.
writ node ls and writ node info show the registered nodes.`,
		Example: `  WRIT_TOKEN=writ-enroll-… writ node --site lab --ledger https://10.0.0.1:7701 \
      --supervisor https://10.0.1.1:7703 --ca ca.crt          # a dispatched site: no Redis credential
  WRIT_REDIS_PASSWORD=… writ node --site lab --ledger https://10.0.0.1:7701 --ca ca.crt \
      --redis rediss://runner@10.0.1.1:6379/0                 # a site without a dispatcher
  writ node --site lab --state-dir /var/lib/writ/node2 --no-network --no-vm …   # a second node here`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c.log = newLogger(cmd)
			return c.Run(cmd.Context(), args)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&c.ledger, "ledger", envOr(envLedger, serviceURL(defaultLedgerAddr)), "ledger URL, or several ledger processes' URLs separated by commas (default $WRIT_LEDGER)")
	fl.StringVar(&c.site, "site", os.Getenv(envSite), "the site this node belongs to (default $WRIT_SITE)")
	fl.StringVar(&c.token, "token", os.Getenv("WRIT_TOKEN"), "the site's enrollment token (default $WRIT_TOKEN); needed until the node is registered")
	fl.StringVar(&c.stateDir, "state-dir", "/var/lib/writ/node", "where the node key (and, as root, network and VM state) live; must survive reboots")
	fl.BoolVar(&c.allowTmpfs, "allow-tmpfs", false, "accept a --state-dir on tmpfs (the node gets a new identity at every boot)")
	c.redis.add(cmd, "the site's Redis")
	fl.StringVar(&c.supervisor, "supervisor", "", "take work from the site's dispatcher (writ supervisor --dispatch) at this URL instead of from its Redis: the node then needs no Redis credential, and is known by its key alone")
	fl.StringVar(&c.listen, "listen", "", `address for the runner's /healthz, /readyz and /metrics ("" for none)`)
	fl.IntVar(&c.concurrency, "concurrency", runner.DefaultConcurrency, "jobs run at once")
	fl.IntVar(&c.cpus, "cpus", 0, "CPUs this node offers to jobs (default: all)")
	fl.StringVar(&c.memory, "memory", "", "memory this node offers to jobs, e.g. 16G (default: all)")
	fl.DurationVar(&c.interval, "uptime-interval", 0, "report uptime this often (default: the site's interval)")
	fl.StringVar(&c.bootIDFile, "boot-id-file", identity.DefaultBootIDFile, "the file that holds this boot's ID (tests that stand in for a reboot give each start its own)")
	_ = fl.MarkHidden("boot-id-file")
	trustTTLFlag(cmd, &c.trustTTL)
	scriptMemoryFlag(cmd, &c.scriptMemory)
	c.tls.add(cmd)
	c.pool.add(cmd)
	c.net.add(cmd, "")
	c.vm.add(cmd, "")
	cmd.AddCommand(nodeListCommands()...)
	return cmd
}

// Run runs the node until ctx ends.
func (c *nodeCmd) Run(ctx context.Context, _ []string) error {
	if c.site == "" {
		return errors.New("--site is required (or $WRIT_SITE)")
	}
	memBytes, err := parseSizeFlag(c.memory, "--memory")
	if err != nil {
		return err
	}
	s, err := c.tls.load(c.listen != "")
	if err != nil {
		return err
	}
	if err := s.checkURL(c.ledger, "--ledger"); err != nil {
		return err
	}
	if c.net.state == "" {
		c.net.state = filepath.Join(c.stateDir, "net")
	}
	if c.vm.dir == "" {
		c.vm.dir = filepath.Join(c.stateDir, "vms")
	}
	// The host layers first: the pool may be the disk the node key lives
	// on (writ init puts --state-dir inside it).
	pool, host, vms, closeLayers, err := openLayers(ctx, c.log, &c.pool, &c.net, &c.vm)
	if err != nil {
		return err
	}
	defer closeLayers()
	agent, err := identity.New(identity.Config{
		StateDir: c.stateDir, AllowTmpfs: c.allowTmpfs, LedgerURL: c.ledger, HTTP: s.client(10 * time.Second), Site: c.site, Token: c.token,
		Capacity: ledger.Capacity{CPUs: c.cpus, MemoryMiB: memBytes >> 20}, Version: version, Interval: c.interval, BootIDFile: c.bootIDFile,
		Used:   func() ledger.Capacity { return vmUse(ctx, vms) },
		Log:    c.log.With("svc", "identity"),
		Status: c.status,
	})
	if err != nil {
		return err
	}
	opener, err := seal.NewOpener(agent.Key())
	if err != nil {
		return err
	}
	var ln net.Listener
	if c.listen != "" {
		if ln, err = s.listen(c.listen, "--listen"); err != nil {
			return err
		}
	}
	// Work from the site's dispatcher (no Redis on the node), or from the
	// site's Redis.
	var q runner.Queue
	if c.supervisor != "" {
		if err := s.checkURL(c.supervisor, "--supervisor"); err != nil {
			return err
		}
		q = &dispatch.Client{BaseURL: c.supervisor, Key: agent.Key(), NodeID: agent.ID(), HTTP: s.client(0), Log: c.log.With("svc", "dispatch")}
	} else {
		rdb, err := c.redis.connect()
		if err != nil {
			return err
		}
		defer rdb.Close()
		q = rdb
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return agent.Run(gctx) })
	g.Go(func() error {
		return runRunner(gctx, c.log, ln, q, runnerParams{sec: s, secrets: opener, key: agent.Key(), ledgerURL: c.ledger, site: c.site, node: agent.ID(),
			concurrency: c.concurrency, trustTTL: c.trustTTL, scriptMemory: c.scriptMemory, pool: pool, net: host, vms: vms})
	})
	return g.Wait()
}

// vmUse is what the node's VMs take, as the node reports it used.
func vmUse(ctx context.Context, vms *vm.Machines) ledger.Capacity {
	if vms == nil {
		return ledger.Capacity{}
	}
	cpus, mem, err := vms.Use(ctx)
	if err != nil {
		return ledger.Capacity{}
	}
	return ledger.Capacity{CPUs: cpus, MemoryMiB: mem}
}

func parseSizeFlag(s, flag string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	n, err := size.Parse(s)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", flag, err)
	}
	return n, nil
}

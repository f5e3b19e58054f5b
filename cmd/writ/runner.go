package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/httpapi"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/runner"
	"github.com/writ-fleet/writ/sal/network"
	"github.com/writ-fleet/writ/sal/storage"
	"github.com/writ-fleet/writ/sal/vm"
	"github.com/writ-fleet/writ/sal/vm/cloudhypervisor"
	"github.com/writ-fleet/writ/sal/vm/qemu"
	"github.com/writ-fleet/writ/scripts/host"
	"github.com/writ-fleet/writ/scripts/sandbox"
	"github.com/writ-fleet/writ/seal"
)

type runnerCmd struct {
	site, node, ledger, listen string
	redis                      redisFlags
	concurrency, dequeuers     int
	pool                       poolFlags
	net                        netFlags
	vm                         vmFlags
	poll, trustTTL             time.Duration
	scriptMemory, nodeKey      string
	nodeChanged                bool
	tls                        serviceTLS
	log                        *slog.Logger
}

func runnerCommand() *cobra.Command {
	c := &runnerCmd{}
	cmd := &cobra.Command{
		Use:   "runner",
		Short: "Run a runner: take jobs of a site and of this node from Redis and run them",
		Long: `A runner takes jobs from its site's queue and its own node's queue, verifies
each signed envelope again, runs the script and reports events. Run one on
every node; more runners, more capacity. It serves /healthz, /readyz and
/metrics on --listen.

Each script runs in a sandbox process of its own (this executable, one per
--concurrency slot, started ahead): a deadline (the job's timeout), a memory
limit (--script-memory, or less if the site says), an allocation cap, and
bounded logs and result. The runner makes the script's storage, net and vm
calls itself, as the job's owner: a deployer's job sees and changes only
its owner's volumes, networks and VMs; a site admin's sees all.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c.log = newLogger(cmd)
			c.nodeChanged = cmd.Flags().Changed("node")
			return c.Run(cmd.Context(), args)
		},
	}
	cmd.Flags().StringVar(&c.site, "site", "", "the site whose jobs to run (required)")
	cmd.Flags().StringVar(&c.node, "node", defaultNodeID(), "this node's ID (its own queue is node:<ID>)")
	c.redis.add(cmd, "the site's Redis")
	cmd.Flags().StringVar(&c.ledger, "ledger", envOr(envLedger, serviceURL(defaultLedgerAddr)), "ledger URL, or the URLs of several ledger processes separated by commas (a call goes to the next when one is down)")
	cmd.Flags().StringVar(&c.listen, "listen", defaultRunnerAddr, `address for /healthz, /readyz and /metrics ("" to turn off)`)
	cmd.Flags().IntVar(&c.concurrency, "concurrency", runner.DefaultConcurrency, "jobs run at once")
	cmd.Flags().DurationVar(&c.poll, "poll", queue.DefaultPollInterval, "how often an idle dequeuer asks Redis for work (lower: less idle latency, more idle Redis load)")
	cmd.Flags().IntVar(&c.dequeuers, "dequeuers", queue.DefaultDequeuers, "parallel loops taking jobs from Redis (each polls when idle)")
	trustTTLFlag(cmd, &c.trustTTL)
	scriptMemoryFlag(cmd, &c.scriptMemory)
	c.tls.add(cmd)
	cmd.Flags().StringVar(&c.nodeKey, "node-key", "", "this node's registered key (writ node makes one): it opens the secrets sealed to the node, signs the outputs of the flow steps it runs (without it, outputs go unsigned and steps here read unsigned inputs), and --node defaults to its ID")
	c.pool.add(cmd)
	c.net.add(cmd, "/var/lib/writ/net")
	c.vm.add(cmd, "/var/lib/writ/vms")
	return cmd
}

// Run runs the runner until ctx ends.
func (c *runnerCmd) Run(ctx context.Context, _ []string) error {
	if !envelope.ValidSite(c.site) {
		return fmt.Errorf("--site %q is missing or not a valid site name", c.site)
	}
	var opener *seal.Opener
	var key *keys.Key
	if c.nodeKey != "" {
		k, err := keys.Load(c.nodeKey)
		if err != nil {
			return fmt.Errorf("--node-key: %w", err)
		}
		id := ledger.NodeID(k.Public)
		if !c.nodeChanged {
			c.node = id
		} else if c.node != id {
			return fmt.Errorf("--node %s is not the ID of --node-key (%s)", c.node, id)
		}
		if opener, err = seal.NewOpener(k); err != nil {
			return err
		}
		key = k
	}
	if !envelope.ValidNode(c.node) {
		return fmt.Errorf("--node %q is not a valid node ID", c.node)
	}
	if c.concurrency < 1 {
		return errors.New("--concurrency must be at least 1")
	}
	s, err := c.tls.load(c.listen != "")
	if err != nil {
		return err
	}
	if err := s.checkURL(c.ledger, "--ledger"); err != nil {
		return err
	}
	var ln net.Listener
	if c.listen != "" {
		if ln, err = s.listen(c.listen, "--listen"); err != nil {
			return err
		}
	}
	rdb, err := c.redis.connect()
	if err != nil {
		return err
	}
	defer rdb.Close()
	pool, host, vms, closeLayers, err := openLayers(ctx, c.log, &c.pool, &c.net, &c.vm)
	if err != nil {
		return err
	}
	defer closeLayers()
	return runRunner(ctx, c.log, ln, rdb, runnerParams{sec: s, secrets: opener, key: key, ledgerURL: c.ledger, site: c.site, node: c.node, concurrency: c.concurrency, dequeuers: c.dequeuers, poll: c.poll, trustTTL: c.trustTTL, scriptMemory: c.scriptMemory, pool: pool, net: host, vms: vms})
}

// runnerParams are the runner's settings from flags.
type runnerParams struct {
	sec                    *sec
	secrets                *seal.Opener // nil: this runner opens no secrets
	key                    *keys.Key    // the node's key; nil: outputs go unsigned, unsigned inputs are taken
	ledgerURL, site, node  string
	concurrency, dequeuers int
	poll, trustTTL         time.Duration
	scriptMemory           string        // --script-memory; "" for the default
	pool                   *storage.Pool // nil: no storage on this node
	net                    *network.Host // nil: no networking on this node
	vms                    *vm.Machines  // nil: no VMs on this node
}

// scriptMemoryFlag adds --script-memory.
func scriptMemoryFlag(cmd *cobra.Command, v *string) {
	cmd.Flags().StringVar(v, "script-memory", "256M", "the most memory one job's script may hold (each script runs in a sandbox process of its own)")
}

// newSandbox starts the runner's sandbox processes: this executable,
// started as a sandbox (sandbox.IsChild), one per concurrent job.
func newSandbox(log *slog.Logger, p runnerParams) (*sandbox.Pool, error) {
	memory := int64(sandbox.DefaultMaxMemory)
	if p.scriptMemory != "" {
		n, err := parseSizeFlag(p.scriptMemory, "--script-memory")
		if err != nil {
			return nil, err
		}
		if n < 16<<20 {
			return nil, fmt.Errorf("--script-memory %s is too small (at least 16M)", p.scriptMemory)
		}
		memory = n
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find this executable to start script sandboxes: %w", err)
	}
	user, why := sandbox.User(exe)
	if why != "" {
		log.Warn("script sandboxes run as root: they would run as nobody, but "+why, "svc", "sandbox")
	}
	return sandbox.New(sandbox.Config{
		User:      user,
		Command:   func() *exec.Cmd { return exec.Command(exe) },
		Size:      p.concurrency,
		MaxMemory: memory,
		Modules:   host.Modules(host.Layers{Storage: p.pool, Network: p.net, VMs: p.vms}),
		Log:       log.With("svc", "sandbox"),
	})
}

func runRunner(ctx context.Context, log *slog.Logger, ln net.Listener, rdb runner.Queue, p runnerParams) error {
	sandbox, err := newSandbox(log, p)
	if err != nil {
		return err
	}
	defer sandbox.Close()
	if p.key == nil {
		log.Warn("no node key: this runner signs no flow step's output and lets steps read outputs no node signed, so a coord or Redis could change what a step reads; give it --node-key (writ node does)", "svc", "runner")
	}
	lc := p.sec.ledgerClient(p.ledgerURL)
	run, err := runner.New(runner.Params{
		Site: p.site, Node: p.node, Redis: rdb,
		Trust:          &ledger.TrustCache{Client: lc, TTL: p.trustTTL},
		Nodes:          &ledger.NodeCache{Client: lc},
		Key:            p.key,
		UnsignedInputs: p.key == nil,
		Scripts:        sandbox,
		Log:            log.With("svc", "runner", "site", p.site, "node", p.node),
		Metrics:        newRegistry(),
		Concurrency:    p.concurrency,
		Dequeuers:      p.dequeuers,
		PollInterval:   p.poll,
		Secrets:        p.secrets,
	})
	if err != nil {
		return err
	}
	if r, ok := rdb.(*queue.Redis); ok {
		if err := r.WaitReady(ctx); err != nil {
			return err
		}
	}
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return run.Run(ctx) })
	if p.vms != nil {
		// Re-attach to the VMs that survived a restart (never a second
		// copy), start those that should run, then watch them. VMs outlive
		// the runner: stopping it stops none of them.
		if err := p.vms.Recover(ctx); err != nil {
			log.Error("recover VMs", "err", err)
		}
		g.Go(func() error { return p.vms.Run(ctx) })
	}
	if ln != nil {
		r := chi.NewRouter()
		httpapi.Ops(r, run.Metrics(), run.Ready)
		g.Go(func() error { return serve(ctx, ln, r) })
	}
	return g.Wait()
}

// openLayers opens the node's host layers: the storage pool, the network
// layer (networks restored) and the VM layer, each nil when off. closeFn
// unmounts the pool (its loop device goes with it); VMs keep running.
func openLayers(ctx context.Context, log *slog.Logger, pf *poolFlags, nf *netFlags, vf *vmFlags) (pool *storage.Pool, host *network.Host, vms *vm.Machines, closeFn func(), err error) {
	closeFn = func() {}
	if pool, err = pf.open(ctx); err != nil {
		return nil, nil, nil, closeFn, err
	}
	if pool != nil {
		closeFn = func() { pool.Close() }
	}
	if host, err = nf.open(ctx, log); err == nil {
		vms, err = vf.open(log, host)
	}
	if err != nil {
		closeFn()
		return nil, nil, nil, func() {}, err
	}
	return pool, host, vms, closeFn, nil
}

// poolFlags choose the node's storage pool.
type poolFlags struct {
	device, file, mount, size string
	force                     bool
	imageAllow                []string
}

func (f *poolFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.device, "pool", "", "block device for the storage pool (formatted only if empty, or with --pool-force)")
	cmd.Flags().StringVar(&f.file, "pool-file", "", "file for a loop-backed storage pool (development), created with --pool-size")
	cmd.Flags().StringVar(&f.size, "pool-size", "20G", "size of a new --pool-file")
	cmd.Flags().StringVar(&f.mount, "pool-mount", "/var/lib/writ/pool", "where the storage pool is mounted")
	cmd.Flags().BoolVar(&f.force, "pool-force", false, "format --pool even if it holds data (destroys it)")
	cmd.Flags().StringSliceVar(&f.imageAllow, "image-allow", nil, "what image downloads (storage.image) may reach besides public addresses: address ranges (10.0.0.0/8) or servers (127.0.0.1:7706); loopback, private, link-local and reserved addresses are refused otherwise")
}

// imagePolicy reads --image-allow.
func (f *poolFlags) imagePolicy() (storage.ImagePolicy, error) {
	var p storage.ImagePolicy
	for _, v := range f.imageAllow {
		if err := p.ParseImageAllow(v); err != nil {
			return p, fmt.Errorf("--image-allow: %w", err)
		}
	}
	return p, nil
}

// open mounts the pool, or returns nil when none was asked for.
func (f *poolFlags) open(ctx context.Context) (*storage.Pool, error) {
	if f.device == "" && f.file == "" {
		return nil, nil
	}
	n, err := parseSizeFlag(f.size, "--pool-size")
	if err != nil {
		return nil, err
	}
	policy, err := f.imagePolicy()
	if err != nil {
		return nil, err
	}
	return storage.Open(ctx, storage.Config{Device: f.device, File: f.file, Size: n, Mountpoint: f.mount, Force: f.force, ImageAllow: policy})
}

// netFlags choose the node's network layer.
type netFlags struct {
	state, ns    string
	off          bool
	pool         []string
	forwardPorts string
}

func (f *netFlags) add(cmd *cobra.Command, defaultState string) {
	cmd.Flags().StringVar(&f.state, "net-state", defaultState, "where networks, forwards and address allocations are kept")
	cmd.Flags().StringVar(&f.ns, "net-ns", "", "manage the networks of this network namespace (a path such as /var/run/netns/NAME) instead of the host's")
	cmd.Flags().BoolVar(&f.off, "no-network", false, "run without the network layer (scripts' net calls fail)")
	cmd.Flags().StringSliceVar(&f.pool, "net-pool", []string{network.DefaultAddressPool[0].String()}, "address ranges networks may use (never overlapping an address or route the node has)")
	cmd.Flags().StringVar(&f.forwardPorts, "forward-ports", network.DefaultForwardPorts.String(), "host ports forwards may take (never one a process of the node listens on)")
}

// open returns the network layer with the networks in its state restored
// (bridges and rules are gone after a reboot), or nil when it is off or the
// process is not root.
func (f *netFlags) open(ctx context.Context, log *slog.Logger) (*network.Host, error) {
	if f.off {
		return nil, nil
	}
	if os.Geteuid() != 0 {
		log.Warn("no network layer: networking needs root (scripts' net calls will fail)")
		return nil, nil
	}
	var pool []netip.Prefix
	for _, v := range f.pool {
		p, err := netip.ParsePrefix(v)
		if err != nil || !p.Addr().Is4() {
			return nil, fmt.Errorf("--net-pool %q: want an IPv4 range such as 10.0.0.0/8", v)
		}
		pool = append(pool, p.Masked())
	}
	// Unset (writ init builds these flags without cobra) means the
	// defaults, as network.Config's zero values do.
	ports := network.PortRange{}
	if f.forwardPorts != "" {
		var err error
		if ports, err = network.ParsePortRange(f.forwardPorts); err != nil {
			return nil, fmt.Errorf("--forward-ports: %w", err)
		}
	}
	host, err := network.New(network.Config{StateDir: f.state, NetNS: f.ns, AddressPool: pool, ForwardPorts: ports, Log: log.With("svc", "network")})
	if err != nil {
		return nil, err
	}
	if err := host.Restore(ctx); err != nil {
		return nil, fmt.Errorf("restore networks from %s: %w (or run with --no-network)", f.state, err)
	}
	return host, nil
}

// vmFlags choose the node's VM layer.
type vmFlags struct {
	dir, driver, accel string
	off                bool
}

func (f *vmFlags) add(cmd *cobra.Command, defaultDir string) {
	cmd.Flags().StringVar(&f.dir, "vm-dir", defaultDir, "where VM records, seeds and consoles are kept")
	cmd.Flags().StringVar(&f.driver, "vm-driver", "qemu", "hypervisor: qemu or cloud-hypervisor")
	cmd.Flags().StringVar(&f.accel, "vm-accel", qemu.AccelAuto, "QEMU acceleration: auto (probe KVM, else TCG), kvm or tcg")
	cmd.Flags().BoolVar(&f.off, "no-vm", false, "run without the VM layer (scripts' vm calls fail)")
}

// open returns the VM layer, or nil when it is off, the process is not
// root, or there is no network layer (VM NICs are its taps).
func (f *vmFlags) open(log *slog.Logger, host *network.Host) (*vm.Machines, error) {
	if f.off {
		return nil, nil
	}
	if host == nil {
		log.Warn("no VM layer: it needs the network layer (root, without --no-network)")
		return nil, nil
	}
	var backend vm.Backend
	switch f.driver {
	case "qemu":
		b, err := qemu.New(qemu.Config{Accel: f.accel, Log: log.With("svc", "vm")})
		if err != nil {
			return nil, fmt.Errorf("--vm-driver qemu: %w (or run with --no-vm)", err)
		}
		backend = b
	case "cloud-hypervisor":
		b, err := cloudhypervisor.New(cloudhypervisor.Config{})
		if err != nil {
			return nil, fmt.Errorf("--vm-driver cloud-hypervisor: %w (or run with --no-vm)", err)
		}
		backend = b
	default:
		return nil, fmt.Errorf("--vm-driver %q: want qemu or cloud-hypervisor", f.driver)
	}
	return vm.New(vm.Config{Dir: f.dir, Backend: backend, Exec: host.Do, Log: log.With("svc", "vm")})
}

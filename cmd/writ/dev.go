package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/writ-fleet/writ/identity"
	"github.com/writ-fleet/writ/internal/fleet"
	"github.com/writ-fleet/writ/internal/redisproc"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/ledger/store/sqlite"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/sal/storage"
	"github.com/writ-fleet/writ/seal"
	"github.com/writ-fleet/writ/supervisor"
)

// devSite is the site `writ dev` runs.
const devSite = "local"

type devCmd struct {
	dir, redis, sample, poolSize string
	noPool                       bool
	net                          netFlags
	vm                           vmFlags
	args                         []string
	basePort                     int
	concurrency                  int
	exitAfterSample              bool
	ca                           caSource // --ca: for a Redis given with --redis
	insecure                     bool
	log                          *slog.Logger
}

func devCommand() *cobra.Command {
	c := &devCmd{}
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run a whole fleet in one process: ledger, coord, a supervisor for site local, a runner, and Redis",
		Long: `Run a whole writ fleet on this machine, in one process, with embedded
defaults: a SQLite ledger in DIR, coord, a supervisor for site "local", one
runner, and a redis-server child process (data in DIR/redis) unless --redis
names one. A dev admin key is created in DIR/admin.key on first start. As
root it also mounts a loop-backed btrfs storage pool (DIR/pool.img, sparse)
at DIR/pool for the scripts' storage module, and manages networks (bridges,
taps, nftables table "inet writ") for the net module, with state in DIR/net.

Services talk HTTPS with certificates of a dev CA made in DIR/tls on first
start (ca.crt there is $WRIT_CA), each under its own name, so the
supervisor takes jobs from coord only; --insecure-http serves plain HTTP
instead.

When the fleet is ready, DIR/env holds the environment for client commands:

  . DIR/env && writ run scripts/lib/hello.tengo --arg who=you

Ports: ledger BASE+1, coord BASE+2, supervisor BASE+3, runner BASE+4,
redis BASE+5, and BASE+6 serving DIR/files over HTTP (images for scripts;
make guest puts the demo VM guest there). BASE defaults to 7700.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c.log = newLogger(cmd)
			c.ca.cmd = cmd
			return c.Run(cmd.Context(), args)
		},
	}
	cmd.Flags().StringVar(&c.dir, "dir", ".dev", "data directory (ledger, keys, Redis data, env file)")
	cmd.Flags().StringVar(&c.redis, "redis", "", "use this Redis instead of starting redis-server")
	cmd.Flags().IntVar(&c.basePort, "base-port", 7700, "ports are BASE+1 … BASE+6 (0: any free ports, shown in the banner and DIR/env)")
	cmd.Flags().IntVar(&c.concurrency, "concurrency", 10, "runner concurrency")
	cmd.Flags().StringVar(&c.poolSize, "pool-size", "8G", "size of the sparse storage pool file DIR/pool.img (as root)")
	cmd.Flags().BoolVar(&c.noPool, "no-pool", false, "run without a storage pool")
	c.net.add(cmd, "")
	c.vm.add(cmd, "")
	cmd.Flags().StringArrayVar(&c.args, "arg", nil, "argument for --sample, KEY=VALUE (repeatable; default who=writ dev)")
	cmd.Flags().StringVar(&c.sample, "sample", "", "when ready, run this script as a signed job and print its result")
	cmd.Flags().BoolVar(&c.insecure, "insecure-http", false, "serve plain HTTP without TLS or service identities (loopback only)")
	cmd.Flags().BoolVar(&c.exitAfterSample, "exit-after-sample", false, "stop the fleet after --sample ran (exit status is the job's)")
	return cmd
}

// Run runs the fleet until ctx ends (or the sample ran, with
// --exit-after-sample).
func (c *devCmd) Run(ctx context.Context, _ []string) error {
	dir, err := filepath.Abs(c.dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	// BASE 0 gives every service a free port (tests run fleets side by
	// side); the banner and DIR/env say which.
	port := func(n int) string {
		if c.basePort == 0 {
			return "127.0.0.1:0"
		}
		return fmt.Sprintf("127.0.0.1:%d", c.basePort+n)
	}
	lns := map[string]net.Listener{}
	for name, n := range map[string]int{"ledger": 1, "coord": 2, "supervisor": 3, "runner": 4, "files": 6} {
		addr := port(n)
		ln, err := listen(addr, "--base-port")
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return err
		}
		lns[name] = ln
	}
	ledgerAddr, coordAddr, supAddr, filesAddr := lns["ledger"].Addr().String(), lns["coord"].Addr().String(), lns["supervisor"].Addr().String(), lns["files"].Addr().String()
	closeListeners := func() {
		for _, l := range lns {
			l.Close()
		}
	}
	secs, caPath, err := c.devTLS(filepath.Join(dir, "tls"))
	if err != nil {
		closeListeners()
		return err
	}
	for _, name := range []string{"ledger", "coord", "supervisor", "runner"} {
		lns[name] = secs[name].wrap(lns[name])
	}

	keyPath := filepath.Join(dir, "admin.key")
	admin, err := loadOrMakeKey(keyPath, "dev-admin")
	if err != nil {
		return fmt.Errorf("dev admin key: %w", err)
	}

	// Redis: one ACL user per role (coord, the supervisor, the runner),
	// each with the keys it needs only, the default user off, TLS with the
	// dev CA unless --insecure-http; or the one given with --redis.
	rdbs := map[string]*queue.Redis{}
	redisURL := c.redis
	if redisURL == "" {
		rdir := filepath.Join(dir, "redis")
		if err := os.MkdirAll(rdir, 0o700); err != nil {
			return err
		}
		redisPort := c.basePort + 5
		if c.basePort == 0 {
			if redisPort, err = freePort(); err != nil {
				closeListeners()
				return err
			}
		}
		roles := []string{queue.ACLCoord, queue.ACLSupervisor, queue.ACLRunner}
		pass := fleet.Passwords(roles...)
		users, err := fleet.RedisUsers(devSite, pass, roles...)
		if err != nil {
			closeListeners()
			return err
		}
		cfg := redisproc.Config{Dir: rdir, Port: redisPort, Persist: true, Users: users}
		var creds queue.Credentials
		if caPath != "" {
			cert, key := filepath.Join(dir, "tls", "redis-"+devSite+".crt"), filepath.Join(dir, "tls", "redis-"+devSite+".key")
			cfg.TLS = &redisproc.TLS{Cert: cert, Key: key, CA: caPath}
			creds.TLS = secs["runner"].cfg.Client()
		}
		p, err := redisproc.Start(cfg)
		if err != nil {
			closeListeners()
			return err
		}
		// Stop Redis last, after every service using it has stopped.
		defer p.Stop()
		redisURL = p.URL()
		c.log.Info("redis-server started", "url", redisURL, "dir", rdir, "tls", cfg.TLS != nil)
		for role, pw := range pass {
			creds.Password = pw
			r, err := queue.Dial(p.UserURL(role), creds)
			if err != nil {
				return err
			}
			defer r.Close()
			rdbs[role] = r
		}
	} else {
		rf := redisFlags{url: redisURL, ca: c.ca}
		r, err := rf.connect()
		if err != nil {
			return err
		}
		defer r.Close()
		for _, role := range []string{queue.ACLCoord, queue.ACLSupervisor, queue.ACLRunner} {
			rdbs[role] = r
		}
	}
	for _, r := range rdbs {
		if err := r.WaitReady(ctxTimeout(ctx, 10*time.Second)); err != nil {
			return err
		}
	}

	store, err := sqlite.Open(ctx, filepath.Join(dir, "ledger.db"))
	if err != nil {
		return err
	}
	defer store.Close()
	site := ledger.Site{Name: devSite, SupervisorURL: secs["supervisor"].url(supAddr), Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}}
	if users, err := store.ListUsers(ctx); err != nil {
		return err
	} else if len(users) == 0 {
		if err := ledger.Init(ctx, store, "dev", admin.AuthorizedKey(), &site); err != nil {
			return err
		}
	} else if err := store.PutSite(ctx, site); err != nil { // ports may have moved
		return err
	}

	// The runner is a registered node with a key of its own (DIR/node.key),
	// so secrets sealed to the site's nodes (writ run --secret) open on it.
	nodeKey, err := loadOrMakeKey(filepath.Join(dir, "node.key"), "dev-node")
	if err != nil {
		return fmt.Errorf("dev node key: %w", err)
	}
	nodeID := ledger.NodeID(nodeKey.Public)
	if _, err := store.RegisterNode(ctx, ledger.Node{ID: nodeID, Site: devSite, PublicKey: nodeKey.AuthorizedKey(), Facts: identity.Facts(version), RegisteredAt: time.Now().UTC()}, ""); err != nil {
		return fmt.Errorf("register the dev node: %w", err)
	}
	opener, err := seal.NewOpener(nodeKey)
	if err != nil {
		return err
	}

	// Storage needs root (loop devices, mounts): as root the fleet gets a
	// loop-backed pool in the data directory, unmounted on the way out.
	var pool *storage.Pool
	if os.Geteuid() == 0 && !c.noPool {
		n, err := parseSizeFlag(c.poolSize, "--pool-size")
		if err != nil {
			return err
		}
		// Image downloads may reach the public internet and, of this
		// machine, only writ dev's own file server (not its ledger or
		// Redis on the same loopback).
		files, err := netip.ParseAddrPort(filesAddr)
		if err != nil {
			return fmt.Errorf("file server address %s: %w", filesAddr, err)
		}
		policy := storage.ImagePolicy{Servers: []netip.AddrPort{files}}
		pool, err = storage.Open(ctx, storage.Config{File: filepath.Join(dir, "pool.img"), Size: n, Mountpoint: filepath.Join(dir, "pool"), ImageAllow: policy})
		if err != nil {
			return fmt.Errorf("storage pool: %w (or run with --no-pool)", err)
		}
		defer pool.Close()
		c.log.Info("storage pool mounted", "file", filepath.Join(dir, "pool.img"), "at", pool.Mountpoint())
	} else {
		c.log.Info("no storage pool: scripts' storage calls will fail (run writ dev as root for one)")
	}

	if c.net.state == "" {
		c.net.state = filepath.Join(dir, "net")
	}
	host, err := c.net.open(ctx, c.log)
	if err != nil {
		return fmt.Errorf("network layer: %w", err)
	}
	if c.vm.dir == "" {
		c.vm.dir = filepath.Join(dir, "vms")
	}
	vms, err := c.vm.open(c.log, host)
	if err != nil {
		return fmt.Errorf("VM layer: %w", err)
	}

	g, gctx := errgroup.WithContext(ctx)
	ledgerURL := secs["ledger"].url(ledgerAddr)
	coordURL := secs["coord"].url(coordAddr)
	g.Go(func() error { return runLedger(gctx, c.log, lns["ledger"], store, secs["ledger"], nil, 0) })
	g.Go(func() error {
		return runSupervisor(gctx, c.log, lns["supervisor"], rdbs[queue.ACLSupervisor], ledgerURL, devSite, 0, secs["supervisor"], nil, false)
	})
	g.Go(func() error {
		return runCoord(gctx, c.log, lns["coord"], rdbs[queue.ACLCoord], ledgerURL, "", secs["coord"], 0, nil)
	})
	// DIR/files over HTTP: images for the storage and vm modules (make guest
	// puts the demo guest there).
	filesDir := filepath.Join(dir, "files")
	if err := os.MkdirAll(filesDir, 0o755); err != nil {
		return err
	}
	g.Go(func() error { return serve(gctx, lns["files"], http.FileServer(http.Dir(filesDir))) })
	g.Go(func() error {
		return runRunner(gctx, c.log, lns["runner"], rdbs[queue.ACLRunner], runnerParams{sec: secs["runner"], secrets: opener, key: nodeKey, ledgerURL: ledgerURL, site: devSite, node: nodeID, concurrency: c.concurrency, pool: pool, net: host, vms: vms})
	})

	envFile := filepath.Join(dir, "env")
	// WRIT_NODE names writ dev's node for commands that take one
	// (writ vm ls "$WRIT_NODE"); no writ command reads it by itself.
	env := fmt.Sprintf("export %s=%s\nexport %s=%s\nexport %s=%s\nexport %s=%s\nexport WRIT_NODE=%s\n",
		envCoord, coordURL, envKey, keyPath, envSite, devSite, envLedger, ledgerURL, nodeID)
	if caPath != "" {
		env += fmt.Sprintf("export %s=%s\n", envCA, caPath)
	}
	if err := os.WriteFile(envFile, []byte(env), 0o644); err != nil {
		return err
	}
	g.Go(func() error {
		if err := waitHTTP(gctx, secs["coord"].client(2*time.Second), coordURL+"/readyz"); err != nil {
			return nil
		}
		fmt.Fprintf(os.Stderr, `
writ dev fleet is up (site %q, node %q)
  coord       %s
  ledger      %s
  supervisor  %s
  redis       %s
  files       %s (serves %s)
%sSubmit a job from another shell:
  . %s && %s run scripts/lib/hello.tengo --arg who=you
Stop with Ctrl-C.

`, devSite, nodeID, coordURL, ledgerURL, secs["supervisor"].url(supAddr), queue.Redact(redisURL), httpURL(filesAddr), filesDir, envBanner(env), envFile, selfPath())
		if c.sample == "" {
			return nil
		}
		r := &runCmd{coord: coordURL, sec: &sec{cfg: secs["runner"].cfg}}
		r.key, r.site, r.timeout, r.valid, r.maxRetries = keyPath, devSite, time.Minute, time.Hour, 3
		r.args = c.args
		if len(r.args) == 0 {
			r.args = []string{"who=writ dev"}
		}
		err := r.Run(gctx, []string{c.sample})
		if c.exitAfterSample {
			if err == nil {
				err = errSampleDone
			}
			return err
		}
		if err != nil {
			c.log.Error("sample job failed", "err", err)
		}
		return nil
	})
	err = g.Wait()
	if errors.Is(err, errSampleDone) {
		return nil
	}
	return err
}

var errSampleDone = errors.New("sample done")

// selfPath is how to invoke this binary from the current directory.
func selfPath() string {
	exe, err := os.Executable()
	if err != nil {
		return "writ"
	}
	if wd, err := os.Getwd(); err == nil {
		if rel, err := filepath.Rel(wd, exe); err == nil && !strings.HasPrefix(rel, "..") {
			return rel
		}
	}
	if p, err := exec.LookPath("writ"); err == nil && p == exe {
		return "writ"
	}
	return exe
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func ctxTimeout(ctx context.Context, d time.Duration) context.Context {
	c, cancel := context.WithTimeout(ctx, d)
	context.AfterFunc(c, cancel)
	return c
}

// waitHTTP polls url until it answers 200 or ctx ends.
func waitHTTP(ctx context.Context, hc *http.Client, url string) error {
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if resp, err := hc.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// devTLS returns each dev service's sec: certificates of the dev CA in dir
// (made on first start; service certificates issued afresh every start),
// or plain HTTP with --insecure-http. It returns the CA file too.
func (c *devCmd) devTLS(dir string) (map[string]*sec, string, error) {
	names := []string{"ledger", "coord", "supervisor", "runner"}
	secs := map[string]*sec{}
	if c.insecure {
		for _, n := range names {
			secs[n] = &sec{}
		}
		return secs, "", nil
	}
	ca, err := fleet.OpenCA(dir, "writ-dev-ca")
	if err != nil {
		return nil, "", err
	}
	certName := map[string]string{"ledger": ledger.DefaultLedgerName, "coord": supervisor.DefaultCoordName, "supervisor": "supervisor-" + devSite, "runner": "runner-" + devSite}
	if _, _, err := ca.Issue("redis-"+devSite, fleet.Loopback...); err != nil {
		return nil, "", err
	}
	for _, n := range names {
		if _, _, err := ca.Issue(certName[n], fleet.Loopback...); err != nil {
			return nil, "", err
		}
		cfg, err := ca.Config(certName[n])
		if err != nil {
			return nil, "", err
		}
		secs[n] = &sec{cfg: cfg}
	}
	caPath := ca.File()
	return secs, caPath, nil
}

// envBanner is the environment, indented for the banner.
func envBanner(env string) string {
	var b strings.Builder
	b.WriteString("Environment for client commands (also in the env file):\n")
	for _, l := range strings.Split(strings.TrimSpace(env), "\n") {
		b.WriteString("  " + l + "\n")
	}
	return b.String()
}

// loadOrMakeKey loads the key at path, making it first if there is none.
func loadOrMakeKey(path, comment string) (*keys.Key, error) {
	k, err := keys.Load(path)
	if errors.Is(err, os.ErrNotExist) || (err != nil && !fileExists(path)) {
		if k, err = keys.Generate(comment); err == nil {
			err = k.Save(path)
		}
	}
	return k, err
}

// Package identity is the node-side agent that `writ node` runs: it makes
// the node's ed25519 key once and keeps it on persistent storage (the key
// is the node's identity: its ID is derived from it), registers the node
// with the ledger using the site's enrollment token, and sends signed
// uptime reports on schedule, keeping each on disk until it lands. It prints a
// status line a person at the console can act on.
package identity

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/internal/atomicfile"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
)

// Defaults.
const (
	// KeyFile is the node key's name in the state directory.
	KeyFile = "node.key"
	// RegisteredFile in the state directory says the node registered
	// (it holds the site's name): a later start reports at once.
	RegisteredFile = "registered"
	// retryMin and retryMax bound the backoff between failed calls.
	retryMin = 500 * time.Millisecond
	retryMax = 30 * time.Second
	// finalReportTimeout bounds the last report sent on the way out.
	finalReportTimeout = 5 * time.Second
)

// DefaultBootIDFile is where the kernel tells the ID of the current boot.
const DefaultBootIDFile = "/proc/sys/kernel/random/boot_id"

// ErrTmpfs: the state directory would not survive a reboot.
var ErrTmpfs = errors.New("state directory is on tmpfs or ramfs: the node key would not survive a reboot")

// Config sets up an Agent.
type Config struct {
	// StateDir keeps the node key. Required; must be persistent storage.
	StateDir string
	// AllowTmpfs accepts a StateDir on tmpfs (a key that dies with the node).
	AllowTmpfs bool
	// LedgerURL, Site and Token say where and how to register. Required.
	LedgerURL, Site, Token string
	// HTTP calls the ledger (TLS with the site CA); nil: a default client.
	HTTP *http.Client
	// Capacity is what the node offers; zero fields come from its facts.
	Capacity ledger.Capacity
	// Used reports what the node's workloads use now; optional.
	Used func() ledger.Capacity
	// BootIDFile holds the ID of this boot; empty: DefaultBootIDFile,
	// which the kernel makes anew at each boot. (Tests that stand in for
	// a reboot give each "boot" its own file.)
	BootIDFile string
	// Version is writ's version, reported in the facts.
	Version string
	// Interval overrides the site's uptime interval (tests); optional.
	Interval time.Duration
	// Log and Status are optional: the log, and where the one-line status
	// for a person goes (the console).
	Log    *slog.Logger
	Status io.Writer
}

// Agent is a node's identity: its key, registration and uptime reports.
type Agent struct {
	cfg    Config
	key    *keys.Key
	id     string
	client *ledger.Client
	log    *slog.Logger
	bootID string
	queue  *reportQueue

	mu       sync.Mutex
	status   string        // guarded by mu
	interval time.Duration // guarded by mu
}

// New loads the node key from cfg.StateDir, making it the first time, and
// returns the agent. It refuses a state directory on tmpfs unless allowed.
func New(cfg Config) (*Agent, error) {
	switch {
	case cfg.StateDir == "":
		return nil, errors.New("identity: a state directory is required")
	case cfg.LedgerURL == "" || cfg.Site == "":
		return nil, errors.New("identity: the ledger URL and the site are required")
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("identity: state directory: %w", err)
	}
	if onTmpfs(cfg.StateDir) && !cfg.AllowTmpfs {
		return nil, fmt.Errorf("identity: %s: %w (use a disk, or --allow-tmpfs for a throwaway node)", cfg.StateDir, ErrTmpfs)
	}
	path := filepath.Join(cfg.StateDir, KeyFile)
	k, err := keys.Load(path)
	if errors.Is(err, os.ErrNotExist) {
		host, _ := os.Hostname()
		if k, err = keys.Generate("writ-node@" + host); err == nil {
			err = k.Save(path)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("identity: node key %s: %w", path, err)
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	id := ledger.NodeID(k.Public)
	q, err := loadQueue(cfg.StateDir)
	if q == nil {
		return nil, err
	}
	if err != nil {
		log.Warn("uptime reports lost", "err", err)
	}
	bootFile := cfg.BootIDFile
	if bootFile == "" {
		bootFile = DefaultBootIDFile
	}
	a := &Agent{cfg: cfg, key: k, id: id, client: ledger.NodeClient(cfg.LedgerURL, k, cfg.HTTP), log: log.With("node", id),
		bootID: bootID(bootFile), queue: q}
	return a, nil
}

// ID returns the node's ID (derived from its key).
func (a *Agent) ID() string { return a.id }

// Key returns the node's key (it opens the secrets sealed to this node).
func (a *Agent) Key() *keys.Key { return a.key }

// Status returns the current status line.
func (a *Agent) Status() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.status
}

func (a *Agent) setStatus(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	a.mu.Lock()
	changed := line != a.status
	a.status = line
	a.mu.Unlock()
	if changed && a.cfg.Status != nil {
		fmt.Fprintf(a.cfg.Status, "writ node %s: %s\n", a.id, line)
	}
}

// Register registers the node, retrying with backoff until the ledger
// accepts it or ctx ends. A refusal that retrying cannot fix (a bad or
// expired token, a key registered to another site) is still retried, at
// the slowest pace, so that fixing it at the ledger is enough; the status
// line says what is wrong.
func (a *Agent) Register(ctx context.Context) (*ledger.Node, error) {
	facts := Facts(a.cfg.Version)
	capacity := a.cfg.Capacity
	if capacity.CPUs == 0 {
		capacity.CPUs = facts.CPUs
	}
	if capacity.MemoryMiB == 0 {
		capacity.MemoryMiB = facts.MemoryMiB
	}
	req := ledger.RegisterRequest{Site: a.cfg.Site, Token: a.cfg.Token, PublicKey: a.key.AuthorizedKey(), Facts: facts, Capacity: capacity}
	var n *ledger.Node
	err := retry(ctx, func() error {
		var err error
		a.setStatus("registering with %s (site %s)", a.cfg.LedgerURL, a.cfg.Site)
		n, err = a.client.Register(ctx, req)
		if err != nil {
			a.setStatus("NOT registered: %v (retrying)", err)
			a.log.Warn("registration failed", "err", err)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	a.setStatus("registered with site %s as %s", n.Site, n.ID)
	a.log.Info("registered", "site", n.Site)
	if err := atomicfile.WriteFile(filepath.Join(a.cfg.StateDir, RegisteredFile), []byte(n.Site+"\n"), 0o600); err != nil {
		a.log.Warn("registration not kept on disk; the next start registers first again", "err", err)
	}
	return n, nil
}

// registeredBefore reports whether this node registered with its site on
// an earlier start (RegisteredFile names the site).
func (a *Agent) registeredBefore() bool {
	b, err := os.ReadFile(filepath.Join(a.cfg.StateDir, RegisteredFile))
	return err == nil && strings.TrimSpace(string(b)) == a.cfg.Site
}

// Report takes an uptime report and sends it, after any the ledger has not
// acknowledged yet (oldest first), retrying until the queue is empty or ctx
// ends. A report waits in the queue on the state directory, so an outage
// of the ledger, or a restart of the node, does not lose it.
func (a *Agent) Report(ctx context.Context) error {
	return retry(ctx, func() error {
		if err := a.queue.add(a.sample()); err != nil {
			a.log.Warn("uptime report not kept on disk", "err", err)
		}
		return a.flush(ctx)
	})
}

// sample is the node's uptime now.
func (a *Agent) sample() ledger.Uptime {
	u := ledger.Uptime{BootID: a.bootID, UptimeSeconds: uptimeSeconds(), At: time.Now().UTC()}
	if a.cfg.Used != nil {
		u.Used = a.cfg.Used()
	}
	return u
}

// flush sends the queued reports, oldest first, until the queue is empty
// or one fails.
func (a *Agent) flush(ctx context.Context) error {
	for {
		u, ok := a.queue.head()
		if !ok {
			return nil
		}
		rep, err := a.client.ReportUptime(ctx, a.id, u)
		if err != nil && !settled(err) {
			if err := a.queue.waited(); err != nil {
				a.log.Warn("uptime queue not kept on disk", "err", err)
			}
			a.setStatus("registered; uptime report failed: %v (retrying, %d waiting)", err, a.queue.len())
			a.log.Warn("uptime report failed", "err", err, "waiting", a.queue.len())
			return err
		}
		if err := a.queue.done(u); err != nil {
			a.log.Warn("uptime queue not kept on disk", "err", err)
		}
		if err != nil {
			// The ledger has it already, or will never take it.
			a.log.Warn("uptime report dropped", "at", u.At, "boot", u.BootID, "err", err)
			if a.queue.len() == 0 {
				a.setStatus("registered; last uptime report refused: %v", err)
			}
			continue
		}
		if u.Queued {
			a.log.Info("queued uptime report delivered", "at", u.At, "boot", u.BootID, "restarted", rep.Restarted)
		}
		a.mu.Lock()
		if a.cfg.Interval == 0 && rep.Interval > 0 {
			a.interval = rep.Interval.Duration()
		}
		a.mu.Unlock()
		if a.queue.len() == 0 {
			a.setStatus("registered with site %s; %s, reporting every %s", a.cfg.Site, rep.Liveness, a.currentInterval())
		}
	}
}

func (a *Agent) currentInterval() time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case a.cfg.Interval > 0:
		return a.cfg.Interval
	case a.interval > 0:
		return a.interval
	}
	return ledger.DefaultUptimeInterval
}

// Run registers the node and reports its uptime every interval until ctx
// ends; then it sends one last report (a planned stop or reboot).
func (a *Agent) Run(ctx context.Context) error {
	if a.registeredBefore() {
		// The ledger knows this node: registering again only refreshes
		// its facts, and must not hold up the reports (which queue while
		// the ledger is away).
		go a.Register(ctx)
	} else if _, err := a.Register(ctx); err != nil {
		return nil // ctx ended
	}
report:
	for {
		if err := a.Report(ctx); err != nil {
			break // ctx ended
		}
		select {
		case <-ctx.Done():
			break report
		case <-time.After(a.currentInterval()):
		}
	}
	// The node is going down on purpose: say so while it still can. This
	// must outlive ctx, which has just ended.
	// What the ledger does not take now waits on disk for the next start.
	final, cancel := context.WithTimeout(context.WithoutCancel(ctx), finalReportTimeout)
	defer cancel()
	if err := a.queue.add(a.sample()); err != nil {
		a.log.Warn("last uptime report not kept on disk", "err", err)
	}
	if err := a.flush(final); err != nil {
		a.log.Warn("last uptime report failed; it waits for the next start", "err", err)
	}
	a.setStatus("stopped")
	return nil
}

// retry calls fn until it succeeds or ctx ends, with jittered exponential
// backoff.
func retry(ctx context.Context, fn func() error) error {
	wait := retryMin
	for {
		if err := fn(); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait/2 + rand.N(wait/2+1)):
		}
		wait = min(wait*2, retryMax)
	}
}

// onTmpfs reports whether dir is on tmpfs or ramfs.
func onTmpfs(dir string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return false
	}
	return st.Type == unix.TMPFS_MAGIC || st.Type == unix.RAMFS_MAGIC
}

func bootID(file string) string {
	b, err := os.ReadFile(file)
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

func uptimeSeconds() int64 {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return 0
	}
	f, _ := strconv.ParseFloat(strings.Fields(string(b))[0], 64)
	return int64(f)
}

// Facts gathers the node's hardware and software facts.
func Facts(version string) ledger.Facts {
	f := ledger.Facts{WritVersion: version, CPUs: runtime.NumCPU()}
	f.Hostname, _ = os.Hostname()
	var uts unix.Utsname
	if unix.Uname(&uts) == nil {
		f.Kernel = unix.ByteSliceToString(uts.Release[:])
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				kb, _ := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
				f.MemoryMiB = kb / 1024
			}
		}
	}
	blocks, _ := filepath.Glob("/sys/block/*/size")
	for _, p := range blocks {
		name := filepath.Base(filepath.Dir(p))
		if strings.HasPrefix(name, "loop") || strings.HasPrefix(name, "ram") {
			continue
		}
		b, _ := os.ReadFile(p)
		sectors, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		f.Disks = append(f.Disks, struct {
			Name      string `json:"name"`
			SizeBytes int64  `json:"size_bytes"`
		}{name, sectors * 512})
	}
	ifaces, _ := net.Interfaces()
	for _, i := range ifaces {
		if i.Flags&net.FlagLoopback != 0 || len(i.HardwareAddr) == 0 {
			continue
		}
		f.NICs = append(f.NICs, struct {
			Name string `json:"name"`
			MAC  string `json:"mac"`
		}{i.Name, i.HardwareAddr.String()})
	}
	return f
}

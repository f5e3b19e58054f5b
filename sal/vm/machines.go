package vm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/writ-fleet/writ/sal/internal/poolfile"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/writ-fleet/writ/internal/atomicfile"
	"github.com/writ-fleet/writ/internal/reaper"
)

// Backend is one hypervisor: it launches a VM's process and asks a guest
// to power off. Machines does the rest (records, liveness, kill, restart).
type Backend interface {
	// Name is the backend's name in records ("qemu", "cloud-hypervisor").
	Name() string
	// Launch starts the VM's hypervisor process, detached from the caller
	// (its own session: it outlives a runner restart), boots the guest and
	// returns the process's pid. The command line must name a file in
	// l.Dir: that is how a pid is recognised as the VM's later.
	Launch(ctx context.Context, l Launch) (pid int, err error)
	// Shutdown asks the guest to power off (ACPI power button) and returns
	// once the request is delivered.
	Shutdown(ctx context.Context, dir string) error
}

// Launch is what a Backend needs to start a VM.
type Launch struct {
	Spec    Spec
	Dir     string // the VM's own directory (sockets, pidfile)
	Seed    string // the NoCloud seed image
	Console string // the serial console log, appended to
}

// Defaults for Config.
const (
	DefaultStopGrace      = 10 * time.Second
	DefaultMaxDeaths      = 3
	DefaultDeathWindow    = 10 * time.Minute
	DefaultRestartBackoff = time.Second
	maxRestartBackoff     = time.Minute
	DefaultCheckInterval  = time.Second
	consoleTail           = 2048
)

// Config sets up Machines.
type Config struct {
	// Dir is the state root: one directory per VM. Required.
	Dir string
	// Backend is the hypervisor. Required.
	Backend Backend
	// Exec runs a launch; the network layer's Do, so the hypervisor starts
	// in the namespace where its taps are. Optional: nil calls it directly.
	Exec func(func() error) error
	// StopGrace is how long Stop and Delete wait for a guest to power off
	// before killing it. Default DefaultStopGrace.
	StopGrace time.Duration
	// MaxDeaths within DeathWindow put a VM in the failed state. Defaults
	// DefaultMaxDeaths and DefaultDeathWindow.
	MaxDeaths   int
	DeathWindow time.Duration
	// RestartBackoff is the first restart delay; it doubles per recent
	// death, up to a minute. Default DefaultRestartBackoff.
	RestartBackoff time.Duration
	// CheckInterval is how often Run looks for dead VMs. Default DefaultCheckInterval.
	CheckInterval time.Duration
	// ReapInterval is how often Run reaps dead hypervisor processes.
	// Default reaper.DefaultInterval.
	ReapInterval time.Duration
	// Log is optional.
	Log *slog.Logger
}

// Machines is the VM lifecycle over a Backend, with records under Dir.
type Machines struct {
	cfg Config
	log *slog.Logger

	mu    sync.Mutex
	locks map[string]*sync.Mutex // guarded by mu; one per VM name
}

// New returns the Machines of cfg. It starts nothing: call Recover, then Run.
func New(cfg Config) (*Machines, error) {
	if cfg.Dir == "" || cfg.Backend == nil {
		return nil, errors.New("vm: Config.Dir and Config.Backend are required")
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("vm: state root: %w", err)
	}
	if cfg.Exec == nil {
		cfg.Exec = func(f func() error) error { return f() }
	}
	if cfg.StopGrace == 0 {
		cfg.StopGrace = DefaultStopGrace
	}
	if cfg.MaxDeaths == 0 {
		cfg.MaxDeaths = DefaultMaxDeaths
	}
	if cfg.DeathWindow == 0 {
		cfg.DeathWindow = DefaultDeathWindow
	}
	if cfg.RestartBackoff == 0 {
		cfg.RestartBackoff = DefaultRestartBackoff
	}
	if cfg.CheckInterval == 0 {
		cfg.CheckInterval = DefaultCheckInterval
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Machines{cfg: cfg, log: log, locks: map[string]*sync.Mutex{}}, nil
}

// record is vm.json.
type record struct {
	Spec      Spec        `json:"spec"`
	Backend   string      `json:"backend"`
	Run       bool        `json:"run"`
	State     State       `json:"state"`
	Pid       int         `json:"pid,omitempty"`
	StartedAt time.Time   `json:"started_at,omitzero"`
	Restarts  int         `json:"restarts"`
	Deaths    []time.Time `json:"deaths,omitempty"`
	NextStart time.Time   `json:"next_start,omitzero"`
	LastError string      `json:"last_error,omitempty"`
}

func (m *Machines) dir(name string) string        { return filepath.Join(m.cfg.Dir, name) }
func (m *Machines) recordPath(name string) string { return filepath.Join(m.dir(name), "vm.json") }
func (m *Machines) consolePath(name string) string {
	return filepath.Join(m.dir(name), "console.log")
}

// lock serializes operations on one VM.
func (m *Machines) lock(name string) func() {
	m.mu.Lock()
	l, ok := m.locks[name]
	if !ok {
		l = &sync.Mutex{}
		m.locks[name] = l
	}
	m.mu.Unlock()
	l.Lock()
	return l.Unlock
}

func (m *Machines) load(name string) (*record, error) {
	if !ValidName(name) {
		return nil, fmt.Errorf("%w: name %q", ErrInvalid, name)
	}
	data, err := os.ReadFile(m.recordPath(name))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("vm %q: %w", name, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("vm: %w", err)
	}
	r := &record{}
	if err := json.Unmarshal(data, r); err != nil {
		return nil, fmt.Errorf("vm: record %s is corrupt: %w", m.recordPath(name), err)
	}
	return r, nil
}

func (m *Machines) save(r *record) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	return atomicfile.WriteFile(m.recordPath(r.Spec.Name), data, 0o644)
}

func (m *Machines) info(r *record) Info {
	return Info{Name: r.Spec.Name, Backend: r.Backend, State: r.State, Run: r.Run, Pid: r.Pid, StartedAt: r.StartedAt,
		Restarts: r.Restarts, LastError: r.LastError, Console: m.consolePath(r.Spec.Name), Spec: r.Spec}
}

// alive reports whether r's process runs (see the package doc).
func (m *Machines) alive(r *record) bool {
	return r.Pid > 0 && processAlive(r.Pid, m.dir(r.Spec.Name))
}

// Create records the VM and builds its seed; it does not start it. A VM
// of that name with another spec is ErrConflict while it runs (a stopped
// one takes the new spec).
func (m *Machines) Create(ctx context.Context, spec Spec) (Info, error) {
	spec = spec.withDefaults()
	if err := spec.validate(); err != nil {
		return Info{}, err
	}
	defer m.lock(spec.Name)()
	r, err := m.load(spec.Name)
	if errors.Is(err, ErrNotFound) {
		r = &record{Spec: spec, Backend: m.cfg.Backend.Name()}
	} else if err != nil {
		return Info{}, err
	} else if r.Spec.equal(spec) {
		return m.info(r), nil
	} else if m.alive(r) {
		return Info{}, fmt.Errorf("vm %q runs with another spec (stop or delete it first): %w", spec.Name, ErrConflict)
	} else if r.Backend != m.cfg.Backend.Name() {
		return Info{}, fmt.Errorf("vm %q belongs to backend %s, not %s: %w", spec.Name, r.Backend, m.cfg.Backend.Name(), ErrConflict)
	}
	r.Spec = spec
	if err := os.MkdirAll(m.dir(spec.Name), 0o755); err != nil {
		return Info{}, fmt.Errorf("vm: %w", err)
	}
	if err := WriteSeed(filepath.Join(m.dir(spec.Name), "seed.iso"), spec); err != nil {
		return Info{}, err
	}
	if err := m.save(r); err != nil {
		return Info{}, err
	}
	m.log.Info("vm created", "vm", spec.Name, "backend", r.Backend)
	return m.info(r), nil
}

// Start boots the VM unless it runs, and marks it to be kept running. An
// explicit start clears a failed state.
func (m *Machines) Start(ctx context.Context, name string) (Info, error) {
	defer m.lock(name)()
	r, err := m.load(name)
	if err != nil {
		return Info{}, err
	}
	if m.alive(r) {
		if !r.Run || r.State != StateRunning {
			r.Run, r.State = true, StateRunning
			if err := m.save(r); err != nil {
				return Info{}, err
			}
		}
		return m.info(r), nil
	}
	r.Run, r.Deaths, r.LastError = true, nil, ""
	if err := m.launchLocked(ctx, r); err != nil {
		return m.info(r), err
	}
	return m.info(r), nil
}

// launchLocked starts r's process and records it. A failed launch is
// recorded (the VM stays meant to run, so the watcher retries it).
func (m *Machines) launchLocked(ctx context.Context, r *record) error {
	name := r.Spec.Name
	l := Launch{Spec: r.Spec, Dir: m.dir(name), Seed: filepath.Join(m.dir(name), "seed.iso"), Console: m.consolePath(name)}
	var pid int
	err := m.cfg.Exec(func() error {
		// A missing tap would be created by the hypervisor itself, outside
		// writ's network: refuse instead.
		for _, n := range r.Spec.NICs {
			if _, err := net.InterfaceByName(n.Tap); err != nil {
				return fmt.Errorf("vm %q: tap %s: %w (attach the NIC first)", name, n.Tap, err)
			}
		}
		var err error
		pid, err = m.cfg.Backend.Launch(ctx, l)
		return err
	})
	if err != nil {
		// A failed launch counts as a death: it backs off like one, and
		// too many of them leave the VM failed, with the launch's error.
		now := time.Now()
		m.died(r, now)
		r.Pid = 0
		if len(r.Deaths) >= m.cfg.MaxDeaths {
			r.State = StateFailed
			r.LastError = fmt.Sprintf("launch failed %d times within %s; kept stopped (start it again by hand). Last error: %v", len(r.Deaths), m.cfg.DeathWindow, err)
			m.log.Error("vm failed", "vm", name, "launches", len(r.Deaths), "err", err)
		} else {
			r.State, r.LastError = StateRestarting, "launch failed: "+err.Error()
			r.NextStart = now.Add(m.backoff(r))
			m.log.Warn("vm launch failed", "vm", name, "err", err, "retry_in", m.backoff(r))
		}
		m.save(r)
		return fmt.Errorf("vm %q: launch: %w", name, err)
	}
	r.State, r.Pid, r.StartedAt, r.NextStart = StateRunning, pid, time.Now(), time.Time{}
	m.log.Info("vm started", "vm", name, "pid", pid)
	return m.save(r)
}

// died counts a death (or a failed launch) of r at now, forgetting those
// older than the death window.
func (m *Machines) died(r *record, now time.Time) {
	keep := r.Deaths[:0]
	for _, d := range r.Deaths {
		if now.Sub(d) < m.cfg.DeathWindow {
			keep = append(keep, d)
		}
	}
	r.Deaths = append(keep, now)
}

// backoff is the delay before r's next start: RestartBackoff, doubled for
// each recent death after the first, at most maxRestartBackoff.
func (m *Machines) backoff(r *record) time.Duration {
	d := m.cfg.RestartBackoff
	for i := 1; i < len(r.Deaths) && d < maxRestartBackoff; i++ {
		d *= 2
	}
	return min(d, maxRestartBackoff)
}

// Stop asks the guest to power off, kills it after grace, and marks it
// to stay stopped.
func (m *Machines) Stop(ctx context.Context, name string, grace time.Duration) (Info, error) {
	defer m.lock(name)()
	r, err := m.load(name)
	if err != nil {
		return Info{}, err
	}
	// Mark it stopped first, so the watcher never restarts it meanwhile.
	r.Run = false
	if err := m.save(r); err != nil {
		return Info{}, err
	}
	if grace == 0 {
		grace = m.cfg.StopGrace
	}
	if err := m.stopLocked(ctx, r, grace); err != nil {
		return m.info(r), err
	}
	return m.info(r), nil
}

// stopLocked powers the guest off, gracefully first, then by force, and
// returns once the process has exited.
func (m *Machines) stopLocked(ctx context.Context, r *record, grace time.Duration) error {
	if m.alive(r) {
		_, start, _ := procStat(r.Pid)
		if err := m.cfg.Backend.Shutdown(ctx, m.dir(r.Spec.Name)); err != nil {
			m.log.Warn("vm graceful stop failed; killing", "vm", r.Spec.Name, "err", err)
		} else if waitGone(ctx, r.Pid, start, grace) {
			m.log.Info("vm stopped", "vm", r.Spec.Name)
		}
		if !waitGone(ctx, r.Pid, start, 0) {
			syscall.Kill(r.Pid, syscall.SIGKILL)
			// Wait even if ctx is done: the record must not say stopped
			// while the process lives.
			if !waitGone(context.WithoutCancel(ctx), r.Pid, start, 10*time.Second) {
				return fmt.Errorf("vm %q: pid %d survives SIGKILL", r.Spec.Name, r.Pid)
			}
			m.log.Info("vm killed after the grace period", "vm", r.Spec.Name, "grace", grace.String())
		}
		reaper.Reap(r.Pid) // ours under Run's subreaper: collect it now
	}
	r.State, r.Pid, r.NextStart = StateStopped, 0, time.Time{}
	return m.save(r)
}

// Delete stops the VM and removes its record, seed and console.
func (m *Machines) Delete(ctx context.Context, name string) error {
	defer m.lock(name)()
	r, err := m.load(name)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	r.Run = false
	if err := m.save(r); err != nil {
		return err
	}
	if err := m.stopLocked(ctx, r, m.cfg.StopGrace); err != nil {
		return err
	}
	if err := os.RemoveAll(m.dir(name)); err != nil {
		return fmt.Errorf("vm: delete %s: %w", name, err)
	}
	m.log.Info("vm deleted", "vm", name)
	return nil
}

// Info is the VM as the node sees it.
func (m *Machines) Info(ctx context.Context, name string) (Info, error) {
	r, err := m.load(name)
	if err != nil {
		return Info{}, err
	}
	i := m.info(r)
	if i.State == StateRunning && !m.alive(r) {
		// Died since the watcher last looked; it will act on it.
		i.State = StateRestarting
	}
	return i, nil
}

// List is every VM of the node.
func (m *Machines) List(ctx context.Context) ([]Info, error) {
	names, err := m.names()
	if err != nil {
		return nil, err
	}
	out := []Info{}
	for _, n := range names {
		i, err := m.Info(ctx, n)
		if errors.Is(err, ErrNotFound) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, i)
	}
	return out, nil
}

func (m *Machines) names() ([]string, error) {
	entries, err := os.ReadDir(m.cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("vm: %w", err)
	}
	var out []string
	for _, e := range entries {
		if e.IsDir() && ValidName(e.Name()) && fileExists(m.recordPath(e.Name())) {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out, nil
}

// Use is what the VMs meant to run (started, running, restarting) take
// from the node: the sum of their CPUs and memory, as a node reports it
// as used capacity. Stopped and failed VMs take nothing.
func (m *Machines) Use(ctx context.Context) (cpus int, memoryMiB int64, err error) {
	list, err := m.List(ctx)
	if err != nil {
		return 0, 0, err
	}
	for _, v := range list {
		if v.Run && v.State != StateFailed {
			cpus += v.Spec.CPUs
			memoryMiB += int64(v.Spec.MemoryMiB)
		}
	}
	return cpus, memoryMiB, nil
}

// Console returns up to max bytes of the end of the serial console.
func (m *Machines) Console(ctx context.Context, name string, max int) (string, error) {
	if _, err := m.load(name); err != nil {
		return "", err
	}
	return tail(m.consolePath(name), max), nil
}

// tail returns up to max bytes of the end of a file, starting at a line.
func tail(path string, max int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max64(0, st.Size()-int64(max))
	buf := make([]byte, st.Size()-off)
	n, _ := f.ReadAt(buf, off)
	buf = buf[:n]
	if off > 0 {
		if i := bytes.IndexByte(buf, '\n'); i >= 0 {
			buf = buf[i+1:]
		}
	}
	return strings.ToValidUTF8(string(buf), "?")
}

func max64(a, b int64) int64 {
	if a > b {
		return a
	}
	return b
}

// Recover re-attaches to running VMs and restarts those that should
// run but do not. Call it once at start.
func (m *Machines) Recover(ctx context.Context) error {
	names, err := m.names()
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range names {
		if err := m.check(ctx, n, true); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Run watches the VMs until ctx ends, restarting dead ones (see the
// package doc). It never stops a VM: they outlive the runner.
//
// Hypervisors daemonize, so the processes that run VMs are not children
// anything waits for: Run makes this process a child subreaper and reaps
// them (and their dead intermediates) once they exit, so no VM leaves a
// zombie behind however often it dies or fails to launch.
func (m *Machines) Run(ctx context.Context) error {
	if stop, err := reaper.Subreap(); err != nil {
		m.log.Warn("vm watcher: cannot become a child subreaper; dead hypervisors are left to PID 1", "err", err)
	} else {
		defer stop()
	}
	go reaper.Run(ctx, m.cfg.ReapInterval)
	t := time.NewTicker(m.cfg.CheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		names, err := m.names()
		if err != nil {
			m.log.Error("vm watcher", "err", err)
			continue
		}
		for _, n := range names {
			if err := m.check(ctx, n, false); err != nil && ctx.Err() == nil {
				m.log.Warn("vm watcher", "vm", n, "err", err)
			}
		}
	}
}

// check brings one VM in line with its record: a live VM is (re)attached,
// a dead one that should run counts a death and is restarted after its
// backoff, or marked failed after too many deaths.
func (m *Machines) check(ctx context.Context, name string, recovering bool) error {
	defer m.lock(name)()
	r, err := m.load(name)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if m.alive(r) {
		if recovering {
			m.log.Info("vm re-attached", "vm", name, "pid", r.Pid)
		}
		if !r.Run {
			return nil // a stop is in progress elsewhere, or it was started by hand
		}
		if r.State != StateRunning {
			r.State = StateRunning
			return m.save(r)
		}
		return nil
	}
	if !r.Run || r.State == StateFailed {
		if r.Pid != 0 || (r.State == StateRunning && !r.Run) {
			r.Pid, r.State = 0, StateStopped
			return m.save(r)
		}
		return nil
	}
	now := time.Now()
	if r.State == StateRunning {
		// It died: count it.
		m.died(r, now)
		con := tail(m.consolePath(name), consoleTail)
		m.log.Warn("vm died", "vm", name, "pid", r.Pid, "deaths", len(r.Deaths))
		reaper.Reap(r.Pid)
		r.Pid = 0
		if len(r.Deaths) >= m.cfg.MaxDeaths {
			r.State = StateFailed
			r.LastError = fmt.Sprintf("died %d times within %s; kept stopped (start it again by hand). Last console lines:\n%s", len(r.Deaths), m.cfg.DeathWindow, con)
			m.log.Error("vm failed", "vm", name, "deaths", len(r.Deaths))
			return m.save(r)
		}
		r.State = StateRestarting
		r.LastError = "died; last console lines:\n" + con
		r.NextStart = now.Add(m.backoff(r))
		if !recovering {
			return m.save(r)
		}
		r.NextStart = now // it died while nobody watched: start it now
	}
	if r.State == StateRestarting && now.Before(r.NextStart) {
		return nil // its backoff is not over yet
	}
	if err := m.launchLocked(ctx, r); err != nil {
		return err
	}
	r.Restarts++
	return m.save(r)
}

// specRecord is a Spec as vm.json holds it: File has no decoder (nothing
// outside sal may make one from a string), so a record's paths, which
// Machines wrote itself, become Files here.
type specRecord struct {
	Name      string `json:"name"`
	CPUs      int    `json:"cpus"`
	MemoryMiB int    `json:"memory_mib"`
	Kernel    string `json:"kernel"`
	Initrd    string `json:"initrd"`
	Cmdline   string `json:"cmdline"`
	Firmware  string `json:"firmware"`
	Disks     []struct {
		Path     string `json:"path"`
		ReadOnly bool   `json:"read_only"`
	} `json:"disks"`
	NICs      []NIC     `json:"nics"`
	CloudInit CloudInit `json:"cloud_init"`
}

// UnmarshalJSON reads a record written by save.
func (r *record) UnmarshalJSON(data []byte) error {
	type plain record // record's fields without this method
	var raw struct {
		plain
		Spec specRecord `json:"spec"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return err
	}
	*r = record(raw.plain)
	s := raw.Spec
	r.Spec = Spec{Name: s.Name, CPUs: s.CPUs, MemoryMiB: s.MemoryMiB, Kernel: poolfile.Make(s.Kernel), Initrd: poolfile.Make(s.Initrd),
		Cmdline: s.Cmdline, Firmware: poolfile.Make(s.Firmware), NICs: s.NICs, CloudInit: s.CloudInit}
	for _, d := range s.Disks {
		r.Spec.Disks = append(r.Spec.Disks, Disk{Path: poolfile.Make(d.Path), ReadOnly: d.ReadOnly})
	}
	return nil
}

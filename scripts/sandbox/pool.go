package sandbox

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"github.com/writ-fleet/writ/job"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/d5/tengo/v2"
	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/scripts"
)

// Pool runs scripts in a pool of sandbox processes, one job at a time
// each, so that nothing a script does — however much it allocates, however
// it makes Tengo itself fail — reaches the runner. A child has a data
// (heap) limit in bytes, a smaller stack, a lower priority, no host layers
// and no files; the runner answers its host-layer calls (storage, net, vm)
// under the job's identity, and kills a child that outlives its job's
// deadline. A child that dies, is killed or holds too much memory after a
// run is replaced by a fresh one.
//
// A root runner's children run as nobody when they can (User), so
// even code that escaped Tengo could not read the node's key or the pool.
//
// It is safe for concurrent use; at most Size jobs run at once.
type Pool struct {
	cfg  Config
	host *scripts.Engine // the runner's side: host modules and log limits

	idle   chan *child
	mu     sync.Mutex
	all    map[*child]bool // guarded by mu
	closed bool            // guarded by mu
	spawns sync.WaitGroup
}

// Config sets a Pool up.
type Config struct {
	// Command returns the command that starts one sandbox process (the writ
	// binary, which becomes one when Env is set, or a test binary); Start sets its stdio and environment.
	Command func() *exec.Cmd
	// Size is how many processes are kept started. Default 4.
	Size int
	// MaxMemory caps what one run may hold, in bytes (Input.MaxMemory may
	// ask for less). Default DefaultMaxMemory.
	MaxMemory int64
	// Modules are the host layers' modules; their calls run here, in the
	// runner.
	Modules map[string]scripts.Module
	// Engine sets the log and result limits the runner holds a child to.
	Engine scripts.Config
	// User, when set, is the user and group the processes run as (the
	// runner must be root). See User.
	User *syscall.Credential
	Log  *slog.Logger
}

// Bounds of the runner's side.
const (
	// killGrace is how long a child may take to stop after its job's
	// deadline (or the runner's shutdown) before it is killed.
	killGrace = time.Second
	// retireHeld: a child holding more than this after a run is replaced.
	retireHeld = 64 << 20
	// stderrHead is how much of a child's stderr is kept for the error.
	stderrHead = 8 << 10
)

// New starts a Pool's processes. Close stops them.
func New(cfg Config) (*Pool, error) {
	if cfg.Command == nil {
		return nil, errors.New("sandbox: Config.Command is required")
	}
	if cfg.Size <= 0 {
		cfg.Size = 4
	}
	if cfg.MaxMemory <= 0 {
		cfg.MaxMemory = DefaultMaxMemory
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	s := &Pool{
		cfg:  cfg,
		host: scripts.New(cfg.Engine, cfg.Modules),
		idle: make(chan *child, cfg.Size),
		all:  make(map[*child]bool),
	}
	for i := 0; i < cfg.Size; i++ {
		c, err := s.start()
		if err != nil {
			s.Close()
			return nil, err
		}
		s.idle <- c
	}
	return s, nil
}

// Close kills the sandbox processes and waits for them.
func (s *Pool) Close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	// A replacement being started as Close began joins s.all first.
	s.spawns.Wait()
	s.mu.Lock()
	all := make([]*child, 0, len(s.all))
	for c := range s.all {
		all = append(all, c)
	}
	s.mu.Unlock()
	// An idle child ends at the end of its input; one that does not
	// within a moment is killed.
	for _, c := range all {
		c.stdin.Close()
	}
	deadline := time.After(time.Second)
	for _, c := range all {
		select {
		case <-c.exited:
		case <-deadline:
		}
		c.kill()
		<-c.exited
	}
}

// Run runs script for one job in a sandbox process; see scripts.Engine.Run for
// what it returns. Besides the Engine's errors it returns scripts.ErrMemoryLimit,
// scripts.ErrStackOverflow and scripts.ErrSandbox.
func (s *Pool) Run(ctx context.Context, script string, in scripts.Input) (scripts.Output, error) {
	var c *child
	select {
	case c = <-s.idle:
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return scripts.Output{}, fmt.Errorf("%w (timeout %s): no sandbox process was free", scripts.ErrTimeout, scripts.DeadlineOf(ctx))
		}
		return scripts.Output{}, ctx.Err()
	}
	out, err, healthy := s.runIn(ctx, c, script, in)
	if healthy {
		s.idle <- c
	} else {
		s.replace(c)
	}
	return out, err
}

// NobodyID is the user and group ID sandbox processes of a root runner run
// as when they can (User).
const NobodyID = 65534

// User returns the credential a root runner's sandbox processes
// should run as: nobody, with no groups, when exe can be executed by
// nobody (every directory above it searchable, the file readable and
// executable by others). Otherwise it returns nil and why: the processes
// then run as the runner's user. A non-root runner gets nil and no reason.
func User(exe string) (*syscall.Credential, string) {
	if os.Geteuid() != 0 {
		return nil, ""
	}
	real, err := filepath.EvalSymlinks(exe)
	if err != nil {
		return nil, err.Error()
	}
	st, err := os.Stat(real)
	if err != nil {
		return nil, err.Error()
	}
	if st.Mode().Perm()&0o005 != 0o005 {
		return nil, fmt.Sprintf("%s is not readable and executable by others (mode %s)", real, st.Mode().Perm())
	}
	for dir := filepath.Dir(real); ; dir = filepath.Dir(dir) {
		st, err := os.Stat(dir)
		if err != nil {
			return nil, err.Error()
		}
		if st.Mode().Perm()&0o001 == 0 {
			return nil, fmt.Sprintf("directory %s is not searchable by others (mode %s)", dir, st.Mode().Perm())
		}
		if dir == filepath.Dir(dir) {
			break
		}
	}
	return &syscall.Credential{Uid: NobodyID, Gid: NobodyID, Groups: []uint32{}}, ""
}

// blockingPipe is a pipe whose ends are in blocking mode (see start).
func blockingPipe() (r, w *os.File, err error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC); err != nil {
		return nil, nil, fmt.Errorf("sandbox pipe: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "sandbox-r"), os.NewFile(uintptr(fds[1]), "sandbox-w"), nil
}

// replace kills c and starts another in its place, retrying while
// starting fails.
func (s *Pool) replace(c *child) {
	c.kill()
	s.mu.Lock()
	delete(s.all, c)
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.spawns.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.spawns.Done()
		<-c.exited
		for wait := 100 * time.Millisecond; ; wait = min(2*wait, 10*time.Second) {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return
			}
			n, err := s.start()
			if err == nil {
				s.idle <- n
				return
			}
			s.cfg.Log.Error("start a sandbox process", "err", err, "retry_in", wait)
			time.Sleep(wait)
		}
	}()
}

// child is one sandbox process.
type child struct {
	cmd    *exec.Cmd
	r      *bufio.Reader
	w      *bufio.Writer
	stdin  io.Closer
	stdout io.Closer
	stderr *headBuffer
	exited chan struct{} // closed once the process is reaped
	once   sync.Once
}

func (s *Pool) start() (*child, error) {
	cmd := s.cfg.Command()
	cmd.Env = append(cmd.Env, fmt.Sprintf("%s=%d", Env, s.cfg.MaxMemory))
	// A child dies with the runner, and keeps out of the runner's
	// process group (a terminal's ^C is the runner's to handle).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true, Credential: s.cfg.User}
	c := &child{cmd: cmd, stderr: &headBuffer{max: stderrHead}, exited: make(chan struct{})}
	cmd.Stderr = c.stderr
	// Blocking pipes, not os.Pipe's: a read blocks its thread in the
	// kernel, which wakes it the moment the child writes, where the
	// runtime's poller would take a scheduling round more. Under load
	// that round is most of what a sandbox adds to a job.
	inR, inW, err := blockingPipe()
	if err != nil {
		return nil, err
	}
	outR, outW, err := blockingPipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, err
	}
	cmd.Stdin, cmd.Stdout = inR, outW
	err = cmd.Start()
	inR.Close()
	outW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		return nil, fmt.Errorf("start sandbox process %s: %w", cmd.Path, err)
	}
	c.stdin, c.r, c.w = inW, bufio.NewReaderSize(outR, 64<<10), bufio.NewWriterSize(inW, 64<<10)
	c.stdout = outR
	go func() {
		_ = cmd.Wait()
		close(c.exited)
		// A read blocked in the kernel ends with the child; closing the
		// runner's end after that releases the file.
		c.stdout.Close()
	}()
	s.mu.Lock()
	s.all[c] = true
	s.mu.Unlock()
	return c, nil
}

func (c *child) kill() {
	c.once.Do(func() {
		_ = c.cmd.Process.Kill()
		_ = c.stdin.Close()
	})
}

// runIn runs one job in c. healthy says c may run another.
func (s *Pool) runIn(ctx context.Context, c *child, script string, in scripts.Input) (out scripts.Output, err error, healthy bool) {
	f := &frame{Op: "run", Script: script, Limit: scripts.DeadlineOf(ctx), Memory: in.MaxMemory,
		Input: &wireInput{JobID: in.JobID, Name: in.Name, Site: in.Site, Node: in.Node, Args: in.Args, Attempt: in.Attempt, Secrets: in.Secrets,
			Inputs: in.Inputs, Item: in.Item}}
	if f.Memory <= 0 || f.Memory > s.cfg.MaxMemory {
		f.Memory = s.cfg.MaxMemory
	}
	f.Timeout = time.Hour
	if d, ok := ctx.Deadline(); ok {
		f.Timeout = time.Until(d)
	}
	// The child stops at its deadline by itself; one stuck inside a
	// builtin (or ignoring the runner's shutdown) is killed.
	var (
		mu       sync.Mutex
		timer    *time.Timer
		finished bool
	)
	stop := context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		if !finished {
			timer = time.AfterFunc(killGrace, c.kill)
		}
	})
	defer func() {
		stop()
		mu.Lock()
		defer mu.Unlock()
		finished = true
		if timer != nil && !timer.Stop() {
			healthy = false // killed after all: it goes
		}
	}()

	if err := writeFrame(c.w, f); err != nil {
		return scripts.Output{}, s.died(ctx, c, err), false
	}
	host := s.host.HostRun(ctx, in)
	mods := map[string]map[string]tengo.Object{}
	logBytes, logLines := 0, 0
	for {
		fr, err := readFrame(c.r)
		if err != nil {
			return scripts.Output{}, s.died(ctx, c, err), false
		}
		switch fr.Op {
		case "log":
			// The child holds its runs to the log budget; a child that
			// does not is cut off here, counting as the child counts
			// (scripts.Run.Log), with room for its last, truncation, line.
			logBytes += scripts.LogCost(fr.Line)
			logLines++
			if logBytes <= s.host.Config().MaxLogBytes+scripts.DefaultMaxLogLine && logLines <= scripts.MaxLogLines+1 && in.Log != nil {
				in.Log(fr.Level, fr.Line)
			}
		case "over":
			// The run passed its memory limit: the child is killed now,
			// whether or not its script could still stop by itself.
			c.kill()
			select {
			case <-c.exited:
			case <-time.After(5 * time.Second):
			}
			return scripts.Output{}, &stopped{msg: fmt.Sprintf("%v: the run held more than %s", scripts.ErrMemoryLimit, sizeText(f.Memory)), is: scripts.ErrMemoryLimit}, false
		case "call":
			ret := s.hostCall(host, mods, fr)
			if err := writeFrame(c.w, ret); err != nil {
				return scripts.Output{}, s.died(ctx, c, err), false
			}
		case "done":
			if len(fr.Result) > s.host.Config().MaxResultBytes+64 {
				return scripts.Output{}, fmt.Errorf("%w: its result is over the limit", scripts.ErrSandbox), false
			}
			if err := s.stopError(ctx, host, fr); err != nil {
				return scripts.Output{}, err, fr.Held <= retireHeld
			}
			return scripts.Output{Result: fr.Result}, nil, fr.Held <= retireHeld
		default:
			return scripts.Output{}, s.died(ctx, c, fmt.Errorf("unexpected frame %q", fr.Op)), false
		}
	}
}

// stopError is the error a done frame reports, nil for success.
func (s *Pool) stopError(ctx context.Context, host *scripts.Run, f *frame) error {
	switch f.Kind {
	case stopOK:
		return nil
	case stopTimeout:
		return &stopped{msg: f.Err, is: scripts.ErrTimeout}
	case stopAllocs:
		return &stopped{msg: f.Err, is: scripts.ErrAllocLimit}
	case stopMemory:
		return &stopped{msg: f.Err, is: scripts.ErrMemoryLimit}
	case stopCycle:
		return &stopped{msg: f.Err, is: scripts.ErrCycle}
	case stopResult:
		return &stopped{msg: f.Err, is: scripts.ErrResultTooLarge}
	case stopStack:
		return &stopped{msg: f.Err, is: scripts.ErrStackOverflow}
	case stopRefused:
		return envelope.Refuse(job.Reason(f.Reason), f.Err)
	case stopHost:
		if host.ModuleErr() != nil {
			return host.ModuleErr()
		}
		return &scripts.RuntimeError{Msg: "a host call failed"}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return &scripts.RuntimeError{Msg: f.Err}
}

// hostCall runs the host-layer function a child asked for, as the job.
func (s *Pool) hostCall(host *scripts.Run, mods map[string]map[string]tengo.Object, f *frame) *frame {
	m, ok := mods[f.Module]
	if !ok {
		mod := s.host.Module(f.Module)
		if mod == nil {
			return &frame{Op: "ret", Err: fmt.Sprintf("no host module %q", f.Module)}
		}
		m = mod(host)
		mods[f.Module] = m
	}
	fn, ok := m[f.Name].(*tengo.UserFunction)
	if !ok {
		return &frame{Op: "ret", Err: fmt.Sprintf("%s has no function %q", f.Module, f.Name)}
	}
	args := make([]tengo.Object, len(f.Args))
	for i, a := range f.Args {
		o, err := fromWire(a)
		if err != nil {
			return &frame{Op: "ret", Err: err.Error()}
		}
		args[i] = o
	}
	before := host.ModuleErr()
	ret, err := fn.Value(args...)
	if err != nil {
		return &frame{Op: "ret", Err: err.Error(), Failed: host.ModuleErr() != nil && host.ModuleErr() != before}
	}
	if ret == nil {
		ret = tengo.UndefinedValue
	}
	v, err := toWire(ret)
	if err != nil {
		return &frame{Op: "ret", Err: fmt.Sprintf("%s.%s: %v", f.Module, f.Name, err)}
	}
	return &frame{Op: "ret", Value: v}
}

// died explains a child that stopped answering: killed at the deadline,
// out of memory, out of stack, or otherwise broken.
func (s *Pool) died(ctx context.Context, c *child, cause error) error {
	c.kill()
	select {
	case <-c.exited:
	case <-time.After(5 * time.Second):
	}
	tail := c.stderr.String()
	s.cfg.Log.Warn("sandbox process died", "err", cause, "stderr", lastLines(tail, 3))
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return fmt.Errorf("%w (timeout %s; the script did not stop at its deadline and its sandbox was killed)", scripts.ErrTimeout, scripts.DeadlineOf(ctx))
	case ctx.Err() != nil:
		return ctx.Err()
	case strings.Contains(tail, "out of memory") || strings.Contains(tail, "cannot allocate memory") || strings.Contains(tail, "failed to allocate"):
		return fmt.Errorf("%w: one operation allocated past the sandbox's limit of %d MiB", scripts.ErrMemoryLimit, s.cfg.MaxMemory>>20)
	case strings.Contains(tail, "stack overflow") || strings.Contains(tail, "stack exceeds"):
		return scripts.ErrStackOverflow
	}
	msg := cause.Error()
	if l := lastLines(tail, 1); l != "" {
		msg = l
	}
	return fmt.Errorf("%w: %s", scripts.ErrSandbox, msg)
}

// stopped is a stop the child reported: its message, matching its sentinel.
type stopped struct {
	msg string
	is  error
}

func (e *stopped) Error() string { return e.msg }
func (e *stopped) Unwrap() error { return e.is }

// headBuffer keeps the first max bytes written to it: a Go runtime's
// fatal error comes first, before its goroutines' stacks.
type headBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *headBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if room := t.max - len(t.b); room > 0 {
		t.b = append(t.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (t *headBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

// lastLines returns the last n non-empty lines of s, or its first fatal
// error or panic line when it has one.
func lastLines(s string, n int) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, "fatal error:") || strings.HasPrefix(l, "panic:") {
			return l
		}
		if l != "" {
			keep = append(keep, l)
		}
	}
	if len(keep) > n {
		keep = keep[len(keep)-n:]
	}
	return strings.Join(keep, "; ")
}

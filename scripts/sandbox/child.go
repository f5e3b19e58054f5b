package sandbox

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"

	"github.com/d5/tengo/v2"
	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/scripts"
	"github.com/writ-fleet/writ/scripts/host"
)

// Sizes of a sandbox process.
const (
	// DefaultMaxMemory is what one run may hold unless the runner says less.
	DefaultMaxMemory = 256 << 20
	// childOverhead is what a sandbox process holds besides a run's values:
	// the Go runtime, compiled scripts, buffers. Its hard data limit is
	// twice the runner's memory cap (the garbage collector's room: a heap
	// may reach twice what it keeps before a collection) plus this.
	childOverhead = 96 << 20
	// childStack bounds a goroutine's stack in the child. Tengo's own
	// comparisons, copies and printing of a value that contains itself
	// recurse without end (d5/tengo v2.17.0 objects.go: Array.Equals,
	// Array.Copy, Array.String...); with this bound the child dies of it in
	// milliseconds, and the runner names it (stack_overflow).
	childStack = 16 << 20
	// childCache bounds the compiled scripts a child keeps.
	childCache = 64
	// childNice is a child's scheduling priority (nice).
	childNice = 10
	// childGCPercent is the child's GOGC.
	childGCPercent = 1000
	// childCollect: a child whose heap holds more than this after a run
	// collects it and returns the memory to the OS.
	childCollect = 32 << 20
)

// errMemory is the cause a run is cancelled with when its heap passes the
// limit.
var errMemory = errors.New("memory limit")

// Main is the body of a sandbox process (writ, started by a Pool with
// Env set): it limits
// its own resources, then runs the jobs the runner sends on r, one at a
// time, until r ends. maxMemory is the runner's memory cap for one run
// (the process's data limit is twice that plus its own overhead). It returns
// only on a protocol error or the end of r.
func Main(r io.Reader, w io.Writer, maxMemory int64) error {
	if maxMemory <= 0 {
		maxMemory = DefaultMaxMemory
	}
	if err := limitSelf(2*maxMemory + childOverhead + raceOverhead); err != nil {
		return err
	}
	debug.SetMaxStack(childStack)
	// One script runs at a time: one P. More would only spin, looking for
	// work, on cores the runner and the other children need.
	runtime.GOMAXPROCS(1)
	// A child's own heap is small, so at the default pace it would collect
	// every few dozen runs; the memory limit (set per run) bounds it
	// instead.
	debug.SetGCPercent(childGCPercent)
	// Same module names as the runner's, so scripts compile alike; every
	// host-layer call goes to the runner (Input.host).
	e := scripts.New(scripts.Config{CacheSize: childCache}, host.Modules(host.Layers{}))
	c := &childConn{r: bufio.NewReaderSize(r, 64<<10), w: bufio.NewWriterSize(w, 64<<10)}
	for {
		f, err := readFrame(c.r)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if f.Op != "run" || f.Input == nil {
			return fmt.Errorf("sandbox: expected a run frame, got %q", f.Op)
		}
		done := c.run(e, f, maxMemory)
		if err := c.send(done); err != nil {
			return err
		}
	}
}

// limitSelf sets the process's resource limits: data (heap) in bytes, no
// core dumps, few files, and a lower priority than the runner.
func limitSelf(data int64) error {
	for _, l := range []struct {
		res int
		n   uint64
	}{{unix.RLIMIT_DATA, uint64(data)}, {unix.RLIMIT_CORE, 0}, {unix.RLIMIT_NOFILE, 64}} {
		if err := unix.Setrlimit(l.res, &unix.Rlimit{Cur: l.n, Max: l.n}); err != nil {
			return fmt.Errorf("sandbox: set resource limit %d: %w", l.res, err)
		}
	}
	// A script that computes without end shares the CPU with the runner
	// on unequal terms: the runner's threads, and the children waiting on
	// host calls, come first.
	_ = unix.Setpriority(unix.PRIO_PROCESS, 0, childNice)
	return nil
}

// childConn is a child's end of the protocol.
type childConn struct {
	r *bufio.Reader
	// wmu orders the frames on w: the run's own, and the memory watch's
	// over frame, sent from another goroutine.
	wmu sync.Mutex
	w   *bufio.Writer
	// broken is set when a frame could not be sent or read: the child
	// stops after the run.
	broken error
}

// run runs one job and returns its done frame.
func (c *childConn) run(e *scripts.Engine, f *frame, maxMemory int64) *frame {
	limit := f.Memory
	if limit <= 0 || limit > maxMemory {
		limit = maxMemory
	}
	ctx, cancelTimeout := scripts.WithTimeoutNamed(context.Background(), f.Timeout, f.Limit)
	defer cancelTimeout()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	// The collector works harder as the heap nears the run's limit, so
	// the watch sees it in time.
	debug.SetMemoryLimit(heapLive() + limit + limit/8)
	overMsg := fmt.Sprintf("%v: the run held more than %s", scripts.ErrMemoryLimit, sizeText(limit))
	var overSent sync.WaitGroup
	stopWatch := watchMemory(limit, func() {
		cancel(errMemory)
		// The run stops at its next instruction, unless it is inside one
		// builtin (a copy of a huge value): the runner is told, and kills
		// this process rather than wait for its data limit, which a
		// process that gets little of the CPU reaches only after its
		// deadline. Sent from its own goroutine: the finalizer goroutine
		// must not block on the pipe. It goes before the done frame.
		overSent.Go(func() { _ = c.send(&frame{Op: "over", Err: overMsg}) })
	})
	in := f.Input
	out, err := e.Run(ctx, f.Script, scripts.Input{
		JobID: in.JobID, Name: in.Name, Site: in.Site, Node: in.Node, Args: in.Args, Attempt: in.Attempt, Secrets: in.Secrets,
		Inputs: in.Inputs, Item: in.Item,
		Log:  c.log,
		Host: c,
	})
	stopWatch()
	overSent.Wait()
	done := &frame{Op: "done", Result: out.Result}
	var re *scripts.RuntimeError
	var hs *hostStop
	var ee *envelope.Error
	switch {
	case err == nil:
	case errors.Is(context.Cause(ctx), errMemory):
		done.Kind, done.Err = stopMemory, overMsg
	case errors.Is(err, scripts.ErrTimeout):
		done.Kind, done.Err = stopTimeout, err.Error()
	case errors.Is(err, scripts.ErrAllocLimit):
		done.Kind, done.Err = stopAllocs, err.Error()
	case errors.Is(err, scripts.ErrCycle):
		done.Kind, done.Err = stopCycle, err.Error()
	case errors.Is(err, scripts.ErrResultTooLarge):
		done.Kind, done.Err = stopResult, err.Error()
	case errors.Is(err, scripts.ErrStackOverflow):
		done.Kind, done.Err = stopStack, err.Error()
	case errors.As(err, &hs):
		done.Kind = stopHost
	case errors.As(err, &ee):
		done.Kind, done.Reason, done.Err = stopRefused, string(ee.Reason), ee.Msg
	case errors.As(err, &re):
		done.Kind, done.Err = stopRuntime, re.Msg
	default:
		done.Kind, done.Err = stopRuntime, err.Error()
	}
	// What the run left behind is garbage now. A run that grew the heap
	// gives it back (a collection costs milliseconds, so small runs skip
	// it), and the runner learns what stays: it retires a child that
	// holds too much.
	if heapObjects() > childCollect {
		debug.FreeOSMemory()
		done.Held = heldBytes()
	}
	return done
}

// send writes one frame to the runner.
func (c *childConn) send(f *frame) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return writeFrame(c.w, f)
}

func sizeText(n int64) string { return fmt.Sprintf("%d MiB", n>>20) }

// log sends a job log line to the runner.
func (c *childConn) log(level, line string) {
	if c.broken != nil {
		return
	}
	if err := c.send(&frame{Op: "log", Level: level, Line: line}); err != nil {
		c.broken = err
	}
}

// hostStop is a host-layer call that stopped the run; the runner holds the
// error itself.
type hostStop struct{ msg string }

func (h *hostStop) Error() string { return h.msg }

// call runs a host-layer function in the runner.
func (c *childConn) Call(rc *scripts.Run, module, name string, args []tengo.Object) (tengo.Object, error) {
	if c.broken != nil {
		return nil, rc.Fail(&hostStop{msg: "sandbox: lost the runner: " + c.broken.Error()})
	}
	f := &frame{Op: "call", Module: module, Name: name, Args: make([]*value, len(args))}
	for i, a := range args {
		v, err := toWire(a)
		if err != nil {
			return nil, fmt.Errorf("%s.%s: argument %d: %w", module, name, i+1, err)
		}
		f.Args[i] = v
	}
	if err := c.send(f); err != nil {
		c.broken = err
		return nil, rc.Fail(&hostStop{msg: "sandbox: lost the runner: " + err.Error()})
	}
	ret, err := readFrame(c.r)
	if err == nil && ret.Op != "ret" {
		err = fmt.Errorf("expected a ret frame, got %q", ret.Op)
	}
	if err != nil {
		c.broken = err
		return nil, rc.Fail(&hostStop{msg: "sandbox: lost the runner: " + err.Error()})
	}
	if ret.Failed {
		return nil, rc.Fail(&hostStop{msg: ret.Err})
	}
	if ret.Err != "" {
		return nil, errors.New(ret.Err)
	}
	return fromWire(ret.Value)
}

var memSamples = []metrics.Sample{
	{Name: "/memory/classes/heap/objects:bytes"},
	{Name: "/memory/classes/total:bytes"},
	{Name: "/memory/classes/heap/released:bytes"},
}

// heapObjects is what the heap's objects hold, live or not yet swept.
func heapObjects() int64 {
	s := memSamples[:1:1]
	metrics.Read(s)
	return int64(s[0].Value.Uint64())
}

// heldBytes is the memory the process holds from the OS.
func heldBytes() int64 {
	s := append([]metrics.Sample(nil), memSamples...)
	metrics.Read(s)
	return int64(s[1].Value.Uint64() - s[2].Value.Uint64())
}

// watchMemory calls over once the run's heap, after a collection, holds
// more than limit. It looks after every garbage
// collection, so it costs nothing while a script allocates nothing, and a
// script that allocates is collected at the latest near its limit (the
// runtime's soft limit is set just above it). A single builtin that
// allocates past the limit between two collections meets the process's
// data limit instead, and the runner reports the same reason. The returned
// func stops it.
func watchMemory(limit int64, over func()) func() {
	w := &memWatch{base: heapLive(), limit: limit, over: over}
	w.arm()
	return func() {
		w.mu.Lock()
		w.stopped = true
		w.mu.Unlock()
	}
}

type memWatch struct {
	base, limit int64
	over        func()
	mu          sync.Mutex
	stopped     bool
}

// arm sets a finalizer on a fresh object: it runs after the next
// collection, checks, and arms again.
func (w *memWatch) arm() {
	runtime.SetFinalizer(&gcTick{}, func(*gcTick) { w.check() })
}

type gcTick struct{ _ [16]byte } // not zero-sized: the finalizer must run

func (w *memWatch) check() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return
	}
	if heapLive()-w.base > w.limit {
		w.over()
		return
	}
	w.arm()
}

// heapLive is the heap the last collection found live.
func heapLive() int64 {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	return int64(s[0].Value.Uint64())
}

// IsChild reports whether this process was started as a sandbox process
// (Env set), for a main or a TestMain to call Main.
func IsChild() bool { return os.Getenv(Env) != "" }

// Env is set in a sandbox process's environment to its memory cap.
const Env = "WRIT_SANDBOX_MEMORY"

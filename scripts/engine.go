// Package scripts is the Tengo engine job scripts run on: compiling (with
// the compile limits and the allowed imports), running under limits, and
// writ's own "job" and "log" modules.
//
// # What a script may do
//
// A script may import only the modules the Engine registers: Tengo's standard
// library without "os" (with "fmt" printing to the job log and "times.sleep"
// honouring the deadline), writ's "job" and "log" modules, and any modules
// the runner adds (the host layers: package scripts/host). It has no file,
// process or network access except through those modules. Each run has a
// wall-clock deadline (the job's timeout), an allocation cap
// (Config.MaxAllocs objects, with strings and byte slices capped at
// Config.MaxValueBytes each), and bounded log and result sizes.
//
// The Engine, in process, is what the supervisor checks scripts with
// (with CheckModules: the host modules by name only, so it links no host
// layer) and what a sandbox process runs. The runner runs scripts in
// package scripts/sandbox's pool of processes, so that what Tengo cannot
// bound in process ends that process only; the host modules' calls a
// sandboxed run makes go back to the runner (Input.Host, Run.CallHost).
//
// # Caching
//
// Compiling costs far more than running a small script, so compiled programs
// are cached by the SHA-256 of their source. Tengo fixes imported modules into
// a program at compile time, so a cached program is a small pool of compiled
// instances, each bound to its own run context that is filled in per run.
//
// # Example
//
//	e := scripts.New(scripts.Config{}, nil)
//	out, err := e.Run(ctx, `job := import("job"); job.result({hello: job.args.who})`,
//		scripts.Input{JobID: "j1", Args: []byte(`{"who":"world"}`)})
//	// out.Result == {"hello":"world"}
package scripts

import (
	"container/list"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"github.com/writ-fleet/writ/job"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/d5/tengo/v2"
	"github.com/d5/tengo/v2/parser"
	"github.com/d5/tengo/v2/stdlib"

	"github.com/writ-fleet/writ/envelope"
)

// Defaults for Config.
const (
	DefaultMaxAllocs      = 2_000_000
	DefaultMaxValueBytes  = 4 << 20
	DefaultMaxLogBytes    = 64 << 10
	DefaultMaxLogLine     = 4 << 10
	DefaultMaxResultBytes = 64 << 10
	DefaultCacheSize      = 512
	// MaxLogLines bounds the lines one run may log: each is an event on
	// the site's stream, whatever its length.
	MaxLogLines = 1000
	// LogLineCost is the least a line costs against MaxLogBytes: an
	// event's own fields (its ID, job, level, time) weigh about that much
	// on the stream, so 200,000 empty lines are not free.
	LogLineCost = 64
	// instancesPerProgram bounds the idle compiled instances kept for one
	// script; more concurrent runs compile extra instances and drop them.
	instancesPerProgram = 64
)

// Config tunes an Engine. A zero field means its default.
type Config struct {
	// MaxAllocs caps the objects one run may allocate. Default DefaultMaxAllocs.
	MaxAllocs int64
	// MaxValueBytes caps one string or byte slice. Default DefaultMaxValueBytes.
	// Tengo holds this limit process-wide: the first Engine created in a
	// process sets it, and later ones use that value.
	MaxValueBytes int
	// MaxLogBytes caps the log one run may write. Default DefaultMaxLogBytes.
	MaxLogBytes int
	// MaxResultBytes caps the JSON result. Default DefaultMaxResultBytes.
	MaxResultBytes int
	// CacheSize is how many compiled scripts are kept. Default DefaultCacheSize.
	CacheSize int
}

func (c Config) withDefaults() Config {
	if c.MaxAllocs == 0 {
		c.MaxAllocs = DefaultMaxAllocs
	}
	if c.MaxValueBytes == 0 {
		c.MaxValueBytes = DefaultMaxValueBytes
	}
	if c.MaxLogBytes == 0 {
		c.MaxLogBytes = DefaultMaxLogBytes
	}
	if c.MaxResultBytes == 0 {
		c.MaxResultBytes = DefaultMaxResultBytes
	}
	if c.CacheSize == 0 {
		c.CacheSize = DefaultCacheSize
	}
	return c
}

// Module builds a module's attributes bound to one run context. It is called
// once per compiled instance; the functions it returns read the current run
// (context, job, log) from rc when they are called.
type Module func(rc *Run) map[string]tengo.Object

// Engine compiles, caches and runs scripts. It is safe for concurrent use.
type Engine struct {
	cfg     Config
	modules map[string]Module // writ and SAL modules, by import name
	allowed []string          // every importable name, sorted

	mu    sync.Mutex
	cache map[[32]byte]*list.Element // guarded by mu
	lru   *list.List                 // guarded by mu; of *program, most recent first
}

// program is one cached script: its compile result and idle instances.
type program struct {
	hash [32]byte
	err  error // compile error, cached too
	idle chan *instance
}

// instance is one compiled copy of a script bound to its own run context,
// with the VM that runs it and that VM's globals (cleared before each run).
type instance struct {
	vm      *tengo.VM
	globals []tengo.Object
	rc      *Run
}

var valueLimitOnce sync.Once

// stdlibNames are the Tengo standard modules a script may import.
var stdlibNames = []string{"base64", "enum", "fmt", "hex", "json", "math", "rand", "text", "times"}

// HostModuleNames are the import names of the node's host-layer modules
// (package scripts/host, which holds it to this list).
var HostModuleNames = []string{"storage", "net", "vm"}

// CheckModules are the host modules as a checking engine needs them
// (the supervisor's): importable by name, with nothing in them. A script
// compiles against them exactly as against the real ones, since Tengo
// looks a module's members up only when the script runs.
func CheckModules() map[string]Module {
	m := map[string]Module{}
	for _, n := range HostModuleNames {
		m[n] = nil
	}
	return m
}

// New returns an Engine with the standard sandbox modules plus extra
// (import name → module). extra may be nil; a nil module is importable
// and empty (CheckModules).
func New(cfg Config, extra map[string]Module) *Engine {
	cfg = cfg.withDefaults()
	// Tengo reads these limits from package variables, unsynchronized,
	// while scripts run: they are set once per process, by the first
	// Engine, and never written again.
	valueLimitOnce.Do(func() {
		tengo.MaxStringLen = cfg.MaxValueBytes
		tengo.MaxBytesLen = cfg.MaxValueBytes
	})
	cfg.MaxValueBytes = tengo.MaxStringLen
	e := &Engine{
		cfg:     cfg,
		modules: map[string]Module{"job": nil, "log": logModule}, // "job" is special-cased in compile
		cache:   make(map[[32]byte]*list.Element),
		lru:     list.New(),
	}
	for name, m := range extra {
		e.modules[name] = m
	}
	e.allowed = append(e.allowed, stdlibNames...)
	for name := range e.modules {
		e.allowed = append(e.allowed, name)
	}
	sort.Strings(e.allowed)
	return e
}

// Config returns the engine's configuration, defaults filled in.
func (e *Engine) Config() Config { return e.cfg }

// Module returns the host module registered under name, or nil (for an
// unknown name and for "job", which is not a host module).
func (e *Engine) Module(name string) Module {
	if name == "job" {
		return nil
	}
	return e.modules[name]
}

// HostRun is a run context for host-layer calls made on a sandboxed run's
// behalf: the runner's side of the sandbox calls the modules it names
// with it (Module), and reads ModuleErr after each call.
func (e *Engine) HostRun(ctx context.Context, in Input) *Run {
	return &Run{engine: e, ctx: ctx, in: in}
}

// Allowed returns the module names scripts may import.
func (e *Engine) Allowed() []string { return append([]string(nil), e.allowed...) }

// Check compiles script (or finds it in the cache) and returns nil or an
// *envelope.Error with reason script_invalid or forbidden_import.
func (e *Engine) Check(script string) error {
	p := e.program(script)
	if p.err != nil {
		return p.err
	}
	return nil
}

// program returns the cached program for script, compiling it on a miss.
func (e *Engine) program(script string) *program {
	hash := sha256.Sum256([]byte(script))
	e.mu.Lock()
	if el, ok := e.cache[hash]; ok {
		e.lru.MoveToFront(el)
		e.mu.Unlock()
		return el.Value.(*program)
	}
	e.mu.Unlock()

	// Compile outside the lock; two racing compiles of one script are
	// harmless (the second finds the first in the cache below).
	p := &program{hash: hash, idle: make(chan *instance, instancesPerProgram)}
	inst, err := e.compile(script)
	if err != nil {
		p.err = err
	} else {
		p.idle <- inst
	}

	e.mu.Lock()
	defer e.mu.Unlock()
	if el, ok := e.cache[hash]; ok {
		e.lru.MoveToFront(el)
		return el.Value.(*program)
	}
	e.cache[hash] = e.lru.PushFront(p)
	for e.lru.Len() > e.cfg.CacheSize {
		old := e.lru.Back()
		e.lru.Remove(old)
		delete(e.cache, old.Value.(*program).hash)
	}
	return p
}

// importGuard is the module getter of one compile: it hands out the allowed
// modules and records what else the script tried to import.
type importGuard struct {
	modules   *tengo.ModuleMap
	forbidden []string
}

func (g *importGuard) Get(name string) tengo.Importable {
	if m := g.modules.Get(name); m != nil {
		return m
	}
	g.forbidden = append(g.forbidden, name)
	return nil
}

// compile builds one instance of script with modules bound to a fresh run
// context.
//
// Tengo can panic on input it should refuse (tengo.Script.Compile, which
// writ no longer uses, sliced more than 1024 globals past their capacity,
// d5/tengo v2.17.0 script.go), so a panic here is recovered and becomes a
// refusal rather than the end of the supervisor or runner that compiles.
func (e *Engine) compile(script string) (inst *instance, err error) {
	if err := checkComplexity([]byte(script)); err != nil {
		return nil, err
	}
	defer func() {
		if p := recover(); p != nil {
			inst, err = nil, envelope.Refuse(job.ReasonTooComplex, fmt.Sprintf("script is too complex for the compiler (at most %d top-level names, brackets %d deep): %v", MaxGlobals, MaxNesting, p))
		}
	}()
	rc := &Run{engine: e}
	rc.jobMap = newJobMap(rc)
	mods := tengo.NewModuleMap()
	for _, name := range stdlibNames {
		switch name {
		case "enum":
			mods.AddSourceModule(name, []byte(stdlib.SourceModules[name]))
		case "fmt", "times", "json":
			attrs := make(map[string]tengo.Object)
			for k, v := range stdlib.BuiltinModules[name] {
				attrs[k] = v
			}
			for k, v := range sandboxOverrides(name, rc) {
				attrs[k] = v
			}
			mods.AddBuiltinModule(name, attrs)
		case "rand":
			mods.AddBuiltinModule(name, randModule(rc))
		default:
			mods.AddBuiltinModule(name, stdlib.BuiltinModules[name])
		}
	}
	for name, m := range e.modules {
		if name == "job" {
			mods.Add(name, jobImport{rc: rc})
			continue
		}
		if m == nil { // CheckModules: importable, with nothing in it
			mods.AddBuiltinModule(name, map[string]tengo.Object{})
			continue
		}
		mods.AddBuiltinModule(name, m(rc))
	}
	guard := &importGuard{modules: mods}
	bytecode, globals, err := compileProgram([]byte(script), guard)
	if err != nil {
		if len(guard.forbidden) > 0 {
			return nil, envelope.Refuse(job.ReasonForbiddenImport,
				fmt.Sprintf("script imports %q, which the sandbox does not allow (allowed: %s)",
					guard.forbidden[0], strings.Join(e.allowed, ", ")))
		}
		return nil, envelope.Refuse(job.ReasonScriptInvalid, "script does not compile: "+err.Error())
	}
	if globals > MaxGlobals {
		return nil, envelope.Refuse(job.ReasonTooComplex, fmt.Sprintf("script defines %d top-level names, the limit is %d", globals, MaxGlobals))
	}
	g := make([]tengo.Object, globals+1) // as Script.Compile sizes them
	return &instance{vm: tengo.NewVM(bytecode, g, e.cfg.MaxAllocs), globals: g, rc: rc}, nil
}

// compileProgram compiles src as tengo.Script.Compile does, without its
// variables, and returns the bytecode and the number of globals it
// defines.
// The Engine runs a compiled instance on one VM of its own, run after run
// (tengo.Compiled.RunContext makes a VM, some 100 kB, for every run).
func compileProgram(src []byte, modules tengo.ModuleGetter) (*tengo.Bytecode, int, error) {
	symbols := tengo.NewSymbolTable()
	for i, fn := range tengo.GetAllBuiltinFunctions() {
		symbols.DefineBuiltin(i, fn.Name)
	}
	fileSet := parser.NewFileSet()
	srcFile := fileSet.AddFile("(main)", -1, len(src))
	file, err := parser.NewParser(srcFile, src, nil).ParseFile()
	if err != nil {
		return nil, 0, err
	}
	c := tengo.NewCompiler(srcFile, symbols, nil, modules, nil)
	c.EnableFileImport(false)
	if err := c.Compile(file); err != nil {
		return nil, 0, err
	}
	bytecode := c.Bytecode()
	bytecode.RemoveDuplicates()
	return bytecode, symbols.MaxSymbols(), nil
}

// Input is what a run needs to know about its job.
type Input struct {
	JobID   string
	Name    string
	Site    string
	Node    string
	Args    []byte // JSON object, may be empty
	Attempt int    // 1 for the first run
	// Inputs (a JSON object) and Item (any JSON value) are what a step of
	// a flow reads as job.inputs (its dependencies' outputs) and job.item
	// (its fan-out's element); empty for a plain job: job.inputs is then
	// an empty map and job.item undefined.
	Inputs []byte
	Item   []byte
	// Secrets are the job's opened secrets (package seal), read as
	// job.secrets.NAME.
	Secrets map[string]string
	// Log receives each log line as it is written (level is debug, info,
	// warn or error). It may be nil.
	Log func(level, line string)
	// Owner is the tenant the job acts for: the resources its host-layer
	// calls make, see and change are Owner's (see Tenant).
	Owner string
	// Admin: the job's signer is an admin of the site, so it may see every
	// tenant's resources and act for another owner explicitly.
	Admin bool
	// MaxMemory caps what the run may hold, in bytes, in a Sandbox (which
	// also caps it); zero means the sandbox's cap.
	MaxMemory int64

	// Host, when set, is where this run's host-layer calls go instead of
	// the modules' own layers: in a sandbox process, the runner
	// (package scripts/sandbox).
	Host HostCaller
}

// HostCaller runs a host-layer function elsewhere (the runner, for a
// sandbox process). A module function calls it through Run.CallHost.
type HostCaller interface {
	Call(rc *Run, module, name string, args []tengo.Object) (tengo.Object, error)
}

// Output is what a successful run produced.
type Output struct {
	// Result is the JSON value the script passed to job.result, or null.
	Result []byte
}

// Errors a run can end with besides compile errors (see Check) and errors
// returned by modules. The last three are a sandbox process's (package
// scripts/sandbox); they are here so that whoever classifies a run's end
// needs this package alone.
var (
	// ErrMemoryLimit: the run held more memory than its limit.
	ErrMemoryLimit = errors.New("script exceeded its memory limit and was stopped")
	// ErrStackOverflow: the engine ran out of stack; the child died of it.
	ErrStackOverflow = errors.New("script overflowed the engine's stack and was stopped (a recursion too deep, a value that contains itself compared, copied or printed, or values nested too deep)")
	// ErrSandbox: the sandbox process died or broke the protocol.
	ErrSandbox = errors.New("the sandbox process running the script failed")
	// ErrTimeout: the run passed its deadline and was stopped.
	ErrTimeout = errors.New("script ran past its timeout and was stopped")
	// ErrAllocLimit: the run allocated more objects than the cap allows.
	ErrAllocLimit = errors.New("script exceeded the allocation cap and was stopped")
	// ErrResultTooLarge: job.result was given more than MaxResultBytes.
	ErrResultTooLarge = errors.New("result is larger than the limit")
	// ErrTransient marks module errors worth retrying (a busy host, a
	// network blip); modules wrap it, and the runner retries the job.
	ErrTransient = errors.New("transient")
)

// RuntimeError is a script failure at run time.
type RuntimeError struct{ Msg string }

func (e *RuntimeError) Error() string { return "script error: " + e.Msg }

// Run runs script for one job under ctx, whose deadline is the job's
// timeout. A run that ends by ctx's deadline returns ErrTimeout; one that
// hits the allocation cap returns ErrAllocLimit; compile failures return the
// *envelope.Error of Check; a failing script returns *RuntimeError, or the
// module's error when a module aborted it (which may wrap ErrTransient).
func (e *Engine) Run(ctx context.Context, script string, in Input) (Output, error) {
	p := e.program(script)
	if p.err != nil {
		return Output{}, p.err
	}
	var inst *instance
	select {
	case inst = <-p.idle:
	default:
		var err error
		if inst, err = e.compile(script); err != nil {
			return Output{}, err
		}
	}
	args, err := argsObject(in.Args)
	if err != nil {
		return Output{}, &RuntimeError{Msg: "job args: " + err.Error()}
	}
	inputs, err := argsObject(in.Inputs)
	if err != nil {
		return Output{}, &RuntimeError{Msg: "job inputs: " + err.Error()}
	}
	item, err := valueObject(in.Item)
	if err != nil {
		return Output{}, &RuntimeError{Msg: "job item: " + err.Error()}
	}
	rc := inst.rc
	rc.begin(ctx, in, args)
	rc.jobMap.Value["inputs"], rc.jobMap.Value["item"] = inputs, item
	runErr, reusable := inst.run(ctx)
	result, modErr := rc.end()
	if reusable {
		select {
		case p.idle <- inst:
		default: // enough idle instances; let this one go
		}
	}

	switch {
	case runErr == nil:
	case errors.Is(runErr, context.DeadlineExceeded):
		return Output{}, fmt.Errorf("%w (timeout %s)", ErrTimeout, DeadlineOf(ctx))
	case ctx.Err() != nil:
		return Output{}, ctx.Err()
	case errors.Is(runErr, tengo.ErrObjectAllocLimit):
		return Output{}, fmt.Errorf("%w (cap: %d objects)", ErrAllocLimit, e.cfg.MaxAllocs)
	case errors.Is(runErr, ErrStackOverflow):
		return Output{}, runErr
	case errors.Is(runErr, tengo.ErrStackOverflow):
		return Output{}, fmt.Errorf("%w: recursion deeper than the engine's %d frames", ErrStackOverflow, tengo.MaxFrames)
	case errors.Is(runErr, tengo.ErrStringLimit), errors.Is(runErr, tengo.ErrBytesLimit):
		return Output{}, fmt.Errorf("%w: a value grew past %d bytes", ErrAllocLimit, e.cfg.MaxValueBytes)
	case modErr != nil:
		return Output{}, modErr
	default:
		return Output{}, &RuntimeError{Msg: strings.TrimPrefix(runErr.Error(), "Runtime Error: ")}
	}
	return Output{Result: result}, nil
}

// run runs the instance's VM once, from fresh globals, aborting it when
// ctx ends (as tengo.Compiled.RunContext does). reusable says the VM may
// run the next job: not after an error (tengo's VM.Run keeps the error of
// its last run), a panic, or an abort (one may still be on its way).
func (inst *instance) run(ctx context.Context) (err error, reusable bool) {
	clear(inst.globals)
	stop := context.AfterFunc(ctx, inst.vm.Abort)
	defer func() {
		r := recover()
		notAborted := stop()
		switch {
		case r != nil && isStackPanic(r):
			// Tengo's VM indexes its value stack unchecked: a recursion
			// deep enough fills it before the frame limit is reached
			// (d5/tengo v2.17.0 vm.go, v.stack[v.sp]).
			err = fmt.Errorf("%w: recursion deeper than the engine's stack of %d values", ErrStackOverflow, tengo.StackSize)
		case r != nil:
			err = fmt.Errorf("panic: %v", r)
		case !notAborted || ctx.Err() != nil:
			// Stopped by ctx, or ended as it did (a sleep cut short
			// returns normally): say why. stop can win against a
			// context that is done but has not yet started the abort.
			err = ctx.Err()
		}
		reusable = err == nil && notAborted
	}()
	return inst.vm.Run(), false
}

// isStackPanic reports whether a panic recovered from Tengo's VM is its
// value stack overflowing: an index out of range of a slice StackSize long.
func isStackPanic(r any) bool {
	re, ok := r.(runtime.Error)
	return ok && strings.Contains(re.Error(), "index out of range") && strings.Contains(re.Error(), fmt.Sprintf("with length %d", tengo.StackSize))
}

// DeadlineOf is the job's timeout as the context that runs it names it
// (WithTimeout), for messages.
func DeadlineOf(ctx context.Context) string {
	if v, ok := ctx.Value(timeoutKey{}).(string); ok {
		return v
	}
	return "set by the job"
}

type timeoutKey struct{}

// WithTimeout returns a context that expires after the job's timeout d and
// remembers d for the error message of a run it stops.
func WithTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return WithTimeoutNamed(ctx, d, d.String())
}

// WithTimeoutNamed is WithTimeout for what is left of a timeout: it
// expires after d and names the job's whole timeout, limit.
func WithTimeoutNamed(ctx context.Context, d time.Duration, limit string) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithValue(ctx, timeoutKey{}, limit), d)
}

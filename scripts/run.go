package scripts

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"strings"
	"time"

	"github.com/writ-fleet/writ/internal/stack"

	"github.com/d5/tengo/v2"
)

// Run is the context of the run in progress on one compiled instance. The
// engine fills it in before each run and clears it after; module functions
// read it through the accessors. One instance runs one script at a time, so
// no lock is needed.
type Run struct {
	engine *Engine
	ctx    context.Context
	in     Input
	args   tengo.Object

	result    []byte
	moduleErr error // first error a module aborted the script with
	logBytes  int
	logLines  int
	logCut    bool
	jobMap    *tengo.ImmutableMap // the "job" module of this instance
	rng       *rand.Rand          // the "rand" module's generator, new per run
}

func (rc *Run) begin(ctx context.Context, in Input, args tengo.Object) {
	rc.ctx, rc.in, rc.args = ctx, in, args
	rc.result, rc.moduleErr = nil, nil
	rc.logBytes, rc.logLines, rc.logCut = 0, 0, false
	rc.rng = nil // a fresh one on first use (runRand)
	rc.fillJob()
}

func (rc *Run) end() (result []byte, moduleErr error) {
	result, moduleErr = rc.result, rc.moduleErr
	if result == nil {
		result = []byte("null")
	}
	rc.ctx, rc.in, rc.args, rc.result = nil, Input{}, nil, nil
	return result, moduleErr
}

// Context returns the run's context: modules pass it to anything that blocks.
func (rc *Run) Context() context.Context {
	if rc.ctx == nil {
		return context.Background()
	}
	return rc.ctx
}

// ModuleErr is the error a module stopped the run with (Fail), or nil.
func (rc *Run) ModuleErr() error { return rc.moduleErr }

// CallHost sends a host-layer call to the run's Input.Host, when it has
// one (a sandboxed run): handled reports whether it did. A module function
// calls it first and acts on its own layer only when it was not handled.
func (rc *Run) CallHost(module, name string, args []tengo.Object) (obj tengo.Object, handled bool, err error) {
	if rc.in.Host == nil {
		return nil, false, nil
	}
	obj, err = rc.in.Host.Call(rc, module, name, args)
	return obj, true, err
}

// Input returns what the run knows about its job.
func (rc *Run) Input() Input { return rc.in }

// LogCost is what line costs against a run's log budget: its length, and
// at least LogLineCost. The sandbox's runner side counts with it too.
func LogCost(line string) int { return max(len(line), LogLineCost) }

// Log writes a line to the job log, within the run's log budget.
func (rc *Run) Log(level, line string) {
	if rc.logCut {
		return
	}
	maxBytes := rc.engine.cfg.MaxLogBytes
	if len(line) > DefaultMaxLogLine {
		line = line[:DefaultMaxLogLine] + "…(line truncated)"
	}
	cost := LogCost(line)
	switch {
	case rc.logLines >= MaxLogLines:
		rc.logCut = true
		line, level = fmt.Sprintf("log truncated: this run reached its limit of %d lines", MaxLogLines), "warn"
	case rc.logBytes+cost > maxBytes:
		rc.logCut = true
		line, level = fmt.Sprintf("log truncated: this run reached its limit of %d bytes (a line counts at least %d)", maxBytes, LogLineCost), "warn"
	}
	rc.logBytes += cost
	rc.logLines++
	if rc.in.Log != nil {
		rc.in.Log(level, line)
	}
}

// Fail records err as the reason the script stops and returns it for the
// module function to return. Use it for errors the script cannot handle
// (a host failure); return a Tengo error value for errors it can check.
func (rc *Run) Fail(err error) error {
	if rc.moduleErr == nil {
		rc.moduleErr = err
	}
	return err
}

// Func wraps a module function so that a panic inside it becomes an error
// carrying the file and line where it happened, instead of killing the run.
func Func(name string, fn tengo.CallableFunc) *tengo.UserFunction {
	return &tengo.UserFunction{Name: name, Value: func(args ...tengo.Object) (ret tengo.Object, err error) {
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("panic in %s: %v at %s", name, r, stack.PanicSite())
			}
		}()
		return fn(args...)
	}}
}

// jobImport is the importable "job" module. Tengo fixes an imported module
// into the compiled program as an immutable map; each compiled instance has
// its own map, and begin refills its values before every run (no run is in
// progress on the instance then), so one compiled program serves every job
// that runs the same script.
type jobImport struct{ rc *Run }

func (j jobImport) Import(string) (any, error) { return j.rc.jobMap, nil }

// fillJob sets job.id, job.name, job.site, job.node, job.attempt,
// job.args and job.secrets for the run about to start; job.result is
// fixed.
func (rc *Run) fillJob() {
	in := rc.in
	m := rc.jobMap.Value
	m["id"] = &tengo.String{Value: in.JobID}
	m["name"] = &tengo.String{Value: in.Name}
	m["site"] = &tengo.String{Value: in.Site}
	m["node"] = &tengo.String{Value: in.Node}
	m["attempt"] = &tengo.Int{Value: int64(in.Attempt)}
	if rc.args == nil {
		m["args"] = &tengo.Map{Value: map[string]tengo.Object{}}
	} else {
		m["args"] = rc.args
	}
	secrets := make(map[string]tengo.Object, len(in.Secrets))
	for k, v := range in.Secrets {
		secrets[k] = &tengo.String{Value: v}
	}
	m["secrets"] = &tengo.ImmutableMap{Value: secrets}
}

func newJobMap(rc *Run) *tengo.ImmutableMap {
	return &tengo.ImmutableMap{Value: map[string]tengo.Object{
		"__module_name__": &tengo.String{Value: "job"},
		"result":          &tengo.UserFunction{Name: "result", Value: rc.setResult},
		"fail":            &tengo.UserFunction{Name: "fail", Value: rc.fail},
	}}
}

// fail is job.fail(message...): it stops the script and fails the job with
// the message (not retried).
func (rc *Run) fail(args ...tengo.Object) (tengo.Object, error) {
	return nil, rc.Fail(&RuntimeError{Msg: "job.fail: " + joinArgs(args, " ")})
}

// setResult is job.result(value): it records value (JSON-encodable, within
// the size limit) as the job's result. A later call replaces an earlier one.
// The encoder stops at the limit while encoding, and on a value that
// contains itself.
func (rc *Run) setResult(args ...tengo.Object) (tengo.Object, error) {
	if len(args) != 1 {
		return nil, tengo.ErrWrongNumArguments
	}
	max := rc.engine.cfg.MaxResultBytes
	b, err := EncodeValue(args[0], max)
	var big *TooLargeError
	switch {
	case errors.As(err, &big):
		return nil, rc.Fail(fmt.Errorf("job.result: %w of %d bytes", ErrResultTooLarge, max))
	case errors.Is(err, ErrCycle):
		return nil, rc.Fail(fmt.Errorf("job.result: %w", err))
	case err != nil:
		return &tengo.Error{Value: &tengo.String{Value: "result is not JSON-encodable: " + err.Error()}}, nil
	}
	rc.result = b
	return tengo.UndefinedValue, nil
}

// ValueOf converts any JSON value to Tengo; integers stay integers.
func ValueOf(raw []byte) (tengo.Object, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	return fromJSON(v), nil
}

// argsObject converts the job's JSON args to a Tengo map; integers stay
// integers.
func argsObject(raw []byte) (tengo.Object, error) {
	if len(bytes.TrimSpace(raw)) == 0 {
		return &tengo.Map{Value: map[string]tengo.Object{}}, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	if _, ok := v.(map[string]any); !ok {
		return nil, errors.New("args must be a JSON object")
	}
	return fromJSON(v), nil
}

// valueObject converts any JSON value to Tengo; empty is undefined.
func valueObject(raw []byte) (tengo.Object, error) {
	if len(bytes.TrimSpace(raw)) == 0 {
		return tengo.UndefinedValue, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	return fromJSON(v), nil
}

// FromJSON converts a decoded JSON value (decoded with UseNumber) to Tengo.
func fromJSON(v any) tengo.Object {
	switch x := v.(type) {
	case nil:
		return tengo.UndefinedValue
	case bool:
		if x {
			return tengo.TrueValue
		}
		return tengo.FalseValue
	case json.Number:
		if i, err := x.Int64(); err == nil {
			return &tengo.Int{Value: i}
		}
		f, _ := x.Float64()
		return &tengo.Float{Value: f}
	case string:
		return &tengo.String{Value: x}
	case []any:
		a := make([]tengo.Object, len(x))
		for i, e := range x {
			a[i] = fromJSON(e)
		}
		return &tengo.Array{Value: a}
	case map[string]any:
		m := make(map[string]tengo.Object, len(x))
		for k, e := range x {
			m[k] = fromJSON(e)
		}
		return &tengo.Map{Value: m}
	}
	return tengo.UndefinedValue
}

// maxJoined bounds the text joinArgs makes; Log cuts lines shorter still.
const maxJoined = 2 * DefaultMaxLogLine

// joinArgs renders log arguments as Tengo's fmt.print does each one
// (tengo.ToString: a string as it is, undefined as nothing, anything else
// as its String), separated by sep, bounded (see render): a value that
// contains itself cannot make it recurse forever. Tengo's fmt.print and
// fmt.println put nothing between their arguments (Go's fmt.Print adds no
// space between strings); writ's log functions and job.fail put a space.
func joinArgs(args []tengo.Object, sep string) string {
	var b strings.Builder
	for i, a := range args {
		if i > 0 {
			b.WriteString(sep)
		}
		if a == tengo.UndefinedValue {
			continue
		}
		room := maxJoined - b.Len()
		if room <= 0 {
			b.WriteString("…")
			break
		}
		if s, ok := a.(*tengo.String); ok {
			if len(s.Value) > room {
				b.WriteString(s.Value[:room] + "…")
				break
			}
			b.WriteString(s.Value)
		} else {
			b.WriteString(render(a, room))
		}
	}
	return b.String()
}

// logModule is the "log" module: log.debug/info/warn/error(args...) write one
// line to the job log.
func logModule(rc *Run) map[string]tengo.Object {
	m := make(map[string]tengo.Object)
	for _, level := range []string{"debug", "info", "warn", "error"} {
		level := level
		m[level] = Func(level, func(args ...tengo.Object) (tengo.Object, error) {
			rc.Log(level, joinArgs(args, " "))
			return tengo.UndefinedValue, nil
		})
	}
	return m
}

// formatArgs is fmt.printf's and fmt.sprintf's formatting: a format string,
// then arguments Tengo's formatter can print in bounded time
// (checkFormattable).
func formatArgs(name string, args []tengo.Object) (string, error) {
	if len(args) == 0 {
		return "", tengo.ErrWrongNumArguments
	}
	f, ok := args[0].(*tengo.String)
	if !ok {
		return "", tengo.ErrInvalidArgumentType{Name: "format", Expected: "string", Found: args[0].TypeName()}
	}
	if err := checkFormattable(args[1:]); err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	return tengo.Format(f.Value, args[1:]...)
}

// sandboxOverrides replaces the standard functions that would escape the
// sandbox: fmt's printers write to the job log instead of the runner's
// stdout, and times.sleep stops at the run's deadline.
func sandboxOverrides(module string, rc *Run) map[string]tengo.Object {
	switch module {
	case "fmt":
		printer := func(name string, format bool, newline bool) tengo.Object {
			return Func(name, func(args ...tengo.Object) (tengo.Object, error) {
				var line string
				if format {
					s, err := formatArgs(name, args)
					if err != nil {
						return nil, err
					}
					line = s
				} else {
					line = joinArgs(args, "")
				}
				rc.Log("info", strings.TrimSuffix(line, "\n"))
				return tengo.UndefinedValue, nil
			})
		}
		return map[string]tengo.Object{
			"print":   printer("print", false, false),
			"println": printer("println", false, true),
			"printf":  printer("printf", true, false),
			"sprintf": Func("sprintf", func(args ...tengo.Object) (tengo.Object, error) {
				s, err := formatArgs("sprintf", args)
				if err != nil {
					return nil, err
				}
				return &tengo.String{Value: s}, nil
			}),
		}
	case "json":
		// Tengo's json.encode follows nested values with no end and
		// builds all of its output first: this one stops at a cycle and at
		// the value size limit, while encoding.
		return map[string]tengo.Object{
			"encode": Func("encode", func(args ...tengo.Object) (tengo.Object, error) {
				if len(args) != 1 {
					return nil, tengo.ErrWrongNumArguments
				}
				b, err := EncodeJSON(args[0], rc.engine.cfg.MaxValueBytes)
				if err != nil {
					return &tengo.Error{Value: &tengo.String{Value: "json.encode: " + err.Error()}}, nil
				}
				return &tengo.Bytes{Value: b}, nil
			}),
		}
	case "times":
		return map[string]tengo.Object{
			"sleep": Func("sleep", func(args ...tengo.Object) (tengo.Object, error) {
				if len(args) != 1 {
					return nil, tengo.ErrWrongNumArguments
				}
				d, ok := tengo.ToInt64(args[0])
				if !ok {
					return nil, tengo.ErrInvalidArgumentType{Name: "first", Expected: "int(compatible)", Found: args[0].TypeName()}
				}
				t := time.NewTimer(time.Duration(d))
				defer t.Stop()
				select {
				case <-t.C:
				case <-rc.Context().Done():
				}
				return tengo.UndefinedValue, nil
			}),
		}
	}
	return nil
}

package scripts

import (
	"context"
	"errors"
	"fmt"
	"github.com/writ-fleet/writ/job"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/flow"
)

func TestEngine_Run(t *testing.T) {
	e := New(Config{}, nil)
	for _, tc := range []struct {
		name, script, args string
		want               string
	}{
		{"result", `job := import("job"); job.result("hi")`, ``, `"hi"`},
		{"no result", `x := 1`, ``, `null`},
		{"args", `job := import("job"); job.result({greeting: "hello " + job.args.who, n: job.args.n + 1})`, `{"who":"world","n":41}`, `{"greeting":"hello world","n":42}`},
		{"identity", `job := import("job"); job.result([job.id, job.site, job.node, job.attempt])`, ``, `["j1","local","n1",1]`},
		{"stdlib", `text := import("text"); json := import("json"); job := import("job"); job.result(text.to_upper(string(json.encode({a: 1}))))`, ``, `"{\"A\":1}"`},
		{"enum", `enum := import("enum"); job := import("job"); job.result(enum.map([1,2], func(i, x) { return x * 2 }))`, ``, `[2,4]`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := e.Run(context.Background(), tc.script, Input{JobID: "j1", Site: "local", Node: "n1", Attempt: 1, Args: []byte(tc.args)})
			if err != nil {
				t.Fatalf("Run = %v", err)
			}
			if string(out.Result) != tc.want {
				t.Errorf("Result = %s, want %s", out.Result, tc.want)
			}
		})
	}
}

func TestEngine_Check(t *testing.T) {
	e := New(Config{}, nil)
	for _, tc := range []struct {
		name, script string
		want         job.Reason
		msg          string
	}{
		{"ok", `x := 1 + 2`, "", ""},
		{"syntax", `x := (`, job.ReasonScriptInvalid, "does not compile"},
		{"undefined", `y := x + 1`, job.ReasonScriptInvalid, "unresolved reference"},
		{"os", `os := import("os"); os.exit(1)`, job.ReasonForbiddenImport, `"os"`},
		{"file import", `m := import("./evil")`, job.ReasonForbiddenImport, "./evil"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := e.Check(tc.script)
			if got := envelope.ReasonOf(err); got != tc.want {
				t.Fatalf("Check reason = %q (%v), want %q", got, err, tc.want)
			}
			if err != nil && !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Check = %v, want it to mention %q", err, tc.msg)
			}
			// The cached answer is the same.
			if got := envelope.ReasonOf(e.Check(tc.script)); got != tc.want {
				t.Errorf("second Check reason = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestEngine_Run_Limits(t *testing.T) {
	// The value limit is process-wide (set by the first Engine): the default.
	e := New(Config{MaxAllocs: 100_000, MaxResultBytes: 1024}, nil)
	valueLimit := fmt.Sprintf("past %d bytes", DefaultMaxValueBytes)
	for _, tc := range []struct {
		name, script string
		timeout      time.Duration
		want         error
		msg          string
	}{
		{"infinite loop", `for {}`, 300 * time.Millisecond, ErrTimeout, "timeout 300ms"},
		{"sleep past deadline", `times := import("times"); times.sleep(60 * times.second)`, 200 * time.Millisecond, ErrTimeout, "timeout"},
		{"unbounded array", `a := []; for { a = append(a, [1]) }`, 30 * time.Second, ErrAllocLimit, "cap: 100000 objects"},
		{"string doubling", `s := "xxxxxxxx"; for { s = s + s }`, 30 * time.Second, ErrAllocLimit, valueLimit},
		{"huge bytes", `b := bytes(1 << 30)`, 30 * time.Second, ErrAllocLimit, valueLimit},
		{"big result", `job := import("job"); text := import("text"); job.result(text.repeat("x", 5000))`, 30 * time.Second, nil, "result is larger than the limit of 1024 bytes"},
		{"runtime error", `x := 1; y := x.foo()`, 30 * time.Second, nil, "script error"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := WithTimeout(context.Background(), tc.timeout)
			defer cancel()
			start := time.Now()
			_, err := e.Run(ctx, tc.script, Input{JobID: "j"})
			if err == nil {
				t.Fatal("Run succeeded, want an error")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("Run = %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Run = %q, want it to mention %q", err, tc.msg)
			}
			if d := time.Since(start); d > tc.timeout+10*time.Second {
				t.Errorf("Run took %s", d)
			}
		})
	}
	// The engine is still healthy after all of that.
	out, err := e.Run(context.Background(), `job := import("job"); job.result(1)`, Input{})
	if err != nil || string(out.Result) != "1" {
		t.Errorf("Run after limits = %s, %v", out.Result, err)
	}
}

func TestEngine_Run_Log(t *testing.T) {
	e := New(Config{MaxLogBytes: 400}, nil)
	var lines []string
	in := Input{Log: func(level, line string) { lines = append(lines, level+": "+line) }}
	script := `log := import("log"); fmt := import("fmt")
log.info("hello", 42)
fmt.println("via fmt")
fmt.printf("n=%d\n", 7)
for i := 0; i < 50; i++ { log.warn("spam spam spam") }`
	if _, err := e.Run(context.Background(), script, in); err != nil {
		t.Fatal(err)
	}
	want := []string{"info: hello 42", "info: via fmt", "info: n=7"}
	for i, w := range want {
		if i >= len(lines) || lines[i] != w {
			t.Fatalf("lines = %q, want prefix %q", lines, want)
		}
	}
	last := lines[len(lines)-1]
	if !strings.Contains(last, "log truncated") {
		t.Errorf("last line = %q, want a truncation notice", last)
	}
	if len(lines) > 12 {
		t.Errorf("%d lines written, want the budget to stop them", len(lines))
	}
}

// TestEngine_Run_Concurrent runs one cached script for many jobs at once;
// each run must see its own job (run with -race).
func TestEngine_Run_Concurrent(t *testing.T) {
	e := New(Config{}, nil)
	script := `job := import("job"); times := import("times"); times.sleep(1000000); job.result(job.id + ":" + string(job.args.n))`
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			id := fmt.Sprintf("job-%d", i)
			out, err := e.Run(context.Background(), script, Input{JobID: id, Args: []byte(fmt.Sprintf(`{"n":%d}`, i))})
			if err != nil {
				errs <- err
				return
			}
			if want := fmt.Sprintf(`"%s:%d"`, id, i); string(out.Result) != want {
				errs <- fmt.Errorf("job %d got %s, want %s", i, out.Result, want)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func BenchmarkEngine_RunCached(b *testing.B) {
	e := New(Config{}, nil)
	script := `job := import("job"); job.result({ok: true, id: job.id})`
	in := Input{JobID: "bench"}
	for b.Loop() {
		if _, err := e.Run(context.Background(), script, in); err != nil {
			b.Fatal(err)
		}
	}
}

// TestEngine_Run_RandSeed: a seeded script repeats its sequence, runs of
// one compiled script do not share a generator, and a seed in one run
// does not reach a run beside it.
func TestEngine_Run_RandSeed(t *testing.T) {
	e := New(Config{}, nil)
	run := func(script string) string {
		t.Helper()
		out, err := e.Run(context.Background(), script, Input{JobID: "j", Site: "local", Attempt: 1})
		if err != nil {
			t.Fatalf("Run = %v", err)
		}
		return string(out.Result)
	}
	seeded := `rand := import("rand"); job := import("job"); rand.seed(42); job.result([rand.int(), rand.intn(1000), rand.float(), rand.perm(5)])`
	first := run(seeded)
	if again := run(seeded); again != first {
		t.Errorf("seeded runs differ:\n%s\n%s", first, again)
	}
	unseeded := `rand := import("rand"); job := import("job"); job.result(rand.int())`
	a, b := run(unseeded), run(unseeded)
	if a == b {
		t.Errorf("two unseeded runs drew the same number %s", a)
	}
	// The seeded run's sequence must not leak into the next run on the
	// same compiled instance.
	run(`rand := import("rand"); rand.seed(42)`)
	if after := run(`rand := import("rand"); job := import("job"); rand.seed(42); x := rand.int(); job.result(x)`); !strings.Contains(first, strings.Trim(after, "\n")) {
		t.Errorf("reseeded run drew %s, want the first number of %s", after, first)
	}
	if got := run(`rand := import("rand"); job := import("job"); job.result(rand.int())`); strings.Contains(first, got) {
		t.Errorf("an unseeded run after a seeded one drew %s, the seeded sequence's first number", got)
	}
	// rand.rand(seed) generators repeat too, independently of the module's.
	gen := `rand := import("rand"); job := import("job"); r := rand.rand(7); rand.seed(1); job.result([r.int(), r.intn(10)])`
	if x, y := run(gen), run(gen); x != y {
		t.Errorf("rand.rand(7) sequences differ: %s vs %s", x, y)
	}
	for _, bad := range []string{`rand := import("rand"); rand.intn(0)`, `rand := import("rand"); rand.perm(-1)`, `rand := import("rand"); rand.perm(100000000)`} {
		if _, err := e.Run(context.Background(), bad, Input{JobID: "j", Attempt: 1}); err == nil {
			t.Errorf("Run(%s) = nil error, want a refusal (not a panic)", bad)
		}
	}
}

// TestLibrary_Hello: scripts/lib/hello.tengo greets "world" with no args
// and the caller's name with one.
func TestLibrary_Hello(t *testing.T) {
	src, err := os.ReadFile("lib/hello.tengo")
	if err != nil {
		t.Fatal(err)
	}
	e := New(Config{}, nil)
	for args, want := range map[string]string{``: `"hello, world"`, `{"who":"you"}`: `"hello, you"`} {
		out, err := e.Run(context.Background(), string(src), Input{JobID: "j", Site: "local", Node: "n", Attempt: 1, Args: []byte(args)})
		if err != nil {
			t.Fatalf("Run(args %s) = %v", args, err)
		}
		if !strings.Contains(string(out.Result), `"greeting":`+want) {
			t.Errorf("Run(args %s) = %s, want greeting %s", args, out.Result, want)
		}
	}
}

// TestLibrary_Compiles: every script in scripts/lib (embedded in the
// binary for the CLI's own jobs) compiles in the sandbox with the host
// modules.
func TestLibrary_Compiles(t *testing.T) {
	e := New(Config{}, CheckModules())
	entries, err := library.ReadDir("lib")
	if err != nil || len(entries) == 0 {
		t.Fatalf("library = %d entries, %v", len(entries), err)
	}
	for _, de := range entries {
		src, err := Library(de.Name())
		if err != nil {
			t.Fatal(err)
		}
		if err := e.Check(src); err != nil {
			t.Errorf("%s: %v", de.Name(), err)
		}
	}
	if _, err := Library("nope.tengo"); err == nil {
		t.Error("Library(nope.tengo) = nil error")
	}
}

// TestEngine_Run_HostileValues: values that contain themselves, or that are
// small to build and exponentially large to write out, stop the script (or
// come back as an error value) instead of recursing until the process dies.
// Each case here once crashed the runner with a Go stack overflow.
func TestEngine_Run_HostileValues(t *testing.T) {
	e := New(Config{MaxResultBytes: 1 << 10}, nil)
	const cyc = `a := [1]; a[0] = a; m := {}; m.self = m; `
	const dag = `d := [1]; for i := 0; i < 40; i++ { d = [d, d] }; `
	for _, tc := range []struct {
		name, script string
		want         string // in the run's error, or in its result
	}{
		{"result of a cycle", cyc + `job := import("job"); r := job.result(a); job.result(string(r.value))`, "contains itself"},
		{"result of a map cycle", cyc + `job := import("job"); r := job.result(m); job.result(string(r.value))`, "contains itself"},
		{"result of a 2^40 DAG", dag + `job := import("job"); job.result(d)`, "larger than the limit"},
		{"log of a cycle", cyc + `log := import("log"); job := import("job"); log.info(a, m); job.result("logged")`, "logged"},
		{"log of a 2^40 DAG", dag + `log := import("log"); job := import("job"); log.info(d); job.result("logged")`, "logged"},
		{"json.encode of a cycle", cyc + `json := import("json"); job := import("job"); job.result(string(json.encode(a).value))`, "contains itself"},
		{"json.encode of a 2^40 DAG", dag + `json := import("json"); job := import("job"); job.result(string(json.encode(d).value))`, "larger than the limit"},
		{"fmt.println of a cycle", cyc + `fmt := import("fmt"); job := import("job"); fmt.println(a); job.result("printed")`, "printed"},
		{"fmt.printf of a cycle", cyc + `fmt := import("fmt"); fmt.printf("%v", a)`, "contains itself"},
		{"fmt.sprintf of a 2^40 DAG", dag + `fmt := import("fmt"); fmt.sprintf("%v", d)`, "more than 10000 values"},
		{"job.fail of a cycle", cyc + `job := import("job"); job.fail(a)`, "<cycle>"},
		{"deep nesting", `d := 1; for i := 0; i < 100; i++ { d = [d] }; json := import("json"); job := import("job"); job.result(string(json.encode(d).value))`, "deeper than 64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var logs []string
			out, err := e.Run(context.Background(), tc.script, Input{JobID: "j", Attempt: 1, Log: func(_, line string) { logs = append(logs, line) }})
			got := string(out.Result)
			if err != nil {
				got = err.Error()
			}
			if !strings.Contains(got, tc.want) {
				t.Errorf("Run = %q (logs %q), want it to mention %q", got, logs, tc.want)
			}
			for _, l := range logs {
				if len(l) > DefaultMaxLogLine+len("…(line truncated)") {
					t.Errorf("a log line of %d bytes passed the line limit", len(l))
				}
			}
		})
	}
	// The engine still runs jobs afterwards.
	if out, err := e.Run(context.Background(), `job := import("job"); job.result(1)`, Input{JobID: "j", Attempt: 1}); err != nil || string(out.Result) != "1" {
		t.Errorf("a job after the hostile ones = %s, %v", out.Result, err)
	}
}

// TestEngine_Check_CompileLimits: each compile limit, just inside and just
// outside, and a script that made Tengo's compiler panic (more than 1024
// globals) is refused as too_complex instead of killing the process.
func TestEngine_Check_CompileLimits(t *testing.T) {
	e := New(Config{}, nil)
	globals := func(n int) string {
		var b strings.Builder
		for i := 0; i < n; i++ {
			fmt.Fprintf(&b, "a%d := %d\n", i, i)
		}
		return b.String()
	}
	nest := func(n int) string {
		return "x := " + strings.Repeat("(", n) + "1" + strings.Repeat(")", n) + `; s := "((((( in a string"`
	}
	for _, tc := range []struct {
		name, script string
		want         job.Reason
	}{
		{"globals at the limit", globals(MaxGlobals), ""},
		{"globals past the limit", globals(MaxGlobals + 1), job.ReasonTooComplex},
		{"globals past Tengo's room", globals(1100), job.ReasonTooComplex},
		{"nesting at the limit", nest(MaxNesting), ""},
		{"nesting past the limit", nest(MaxNesting + 1), job.ReasonTooComplex},
	} {
		if got := envelope.ReasonOf(e.Check(tc.script)); got != tc.want {
			t.Errorf("%s: Check reason = %q, want %q", tc.name, got, tc.want)
		}
	}
}

// TestEngine_StepInputs: a step of a flow reads its dependencies' outputs
// as job.inputs and its fan-out element as job.item; a plain job sees an
// empty map and undefined, in the engine and in a sandbox alike.
func TestEngine_StepInputs(t *testing.T) {
	e := New(Config{}, nil)
	script := `job := import("job"); job.result({n: job.inputs.fetch * 2, item: job.item, none: is_undefined(job.inputs.nope)})`
	out, err := e.Run(context.Background(), script, Input{JobID: "j", Inputs: []byte(`{"fetch":21}`), Item: []byte(`"b"`)})
	if err != nil || string(out.Result) != `{"item":"b","n":42,"none":true}` {
		t.Fatalf("step run = %s, %v", out.Result, err)
	}
	out, err = e.Run(context.Background(), `job := import("job"); job.result([len(job.inputs), is_undefined(job.item)])`, Input{JobID: "j"})
	if err != nil || string(out.Result) != `[0,true]` {
		t.Fatalf("plain job = %s, %v", out.Result, err)
	}
	if _, err := e.Run(context.Background(), `x := 1`, Input{JobID: "j", Inputs: []byte(`[1]`)}); err == nil || !strings.Contains(err.Error(), "job inputs") {
		t.Errorf("inputs that are not an object = %v", err)
	}
}

// TestLibrary_Flows: the flows in scripts/lib load (schema, rules, the
// scripts they name) and every step's script compiles.
func TestLibrary_Flows(t *testing.T) {
	e := New(Config{}, CheckModules())
	paths, _ := filepath.Glob("lib/*.yaml")
	if len(paths) < 2 {
		t.Fatalf("flows in lib: %v", paths)
	}
	for _, p := range paths {
		fl, err := flow.Load(p, flow.Options{Site: "lab"})
		if err != nil {
			t.Errorf("%s: %v", p, err)
			continue
		}
		steps := fl.Steps
		if fl.Finally != nil {
			steps = append(steps, *fl.Finally)
		}
		for _, s := range steps {
			if err := e.Check(s.Script); err != nil {
				t.Errorf("%s: step %s: %v", p, s.Name, err)
			}
		}
	}
}

// TestEngine_Run_Recursion: recursion without end stops as
// ErrStackOverflow with a message a person can act on, whether Tengo's
// frame limit or its value stack runs out first, and a tail call (which
// Tengo runs in place) runs until the deadline.
func TestEngine_Run_Recursion(t *testing.T) {
	e := New(Config{}, nil)
	for _, src := range []string{
		`f := undefined; f = func(n) { return f(n+1) + 1 }; f(0)`,
		`f := undefined; f = func(a, b, c, d, e, g, h) { x := [a, b]; return f(a, b, c, d, e, g, h) + 1 }; f(1, 2, 3, 4, 5, 6, 7)`,
		`f := undefined; g := undefined; f = func() { return g() + 1 }; g = func() { return f() + 1 }; f()`,
	} {
		_, err := e.Run(context.Background(), src, Input{JobID: "j"})
		if !errors.Is(err, ErrStackOverflow) || strings.Contains(err.Error(), "index out of range") {
			t.Errorf("Run(%s) = %v, want ErrStackOverflow without Go's words", src, err)
		}
	}
	ctx, cancel := WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := e.Run(ctx, `f := undefined; f = func() { return f() }; f()`, Input{JobID: "j"}); !errors.Is(err, ErrTimeout) {
		t.Errorf("Run(a tail call without end) = %v, want ErrTimeout", err)
	}
}

// TestEngine_Run_LogLines: lines cost at least LogLineCost and a run logs
// at most MaxLogLines: just inside, every line is logged; just outside,
// the last is the truncation notice, and 200,000 empty lines are no more.
func TestEngine_Run_LogLines(t *testing.T) {
	e := New(Config{}, nil)
	for _, tc := range []struct {
		n         int
		wantLines int
		cut       bool
	}{{MaxLogLines, MaxLogLines, false}, {MaxLogLines + 1, MaxLogLines + 1, true}, {200000, MaxLogLines + 1, true}} {
		var lines []string
		src := fmt.Sprintf(`log := import("log"); for i := 0; i < %d; i++ { log.info("") }`, tc.n)
		if _, err := e.Run(context.Background(), src, Input{JobID: "j", Log: func(_, l string) { lines = append(lines, l) }}); err != nil {
			t.Fatal(err)
		}
		cut := len(lines) > 0 && strings.Contains(lines[len(lines)-1], fmt.Sprintf("limit of %d lines", MaxLogLines))
		if len(lines) != tc.wantLines || cut != tc.cut {
			t.Errorf("%d empty lines: logged %d (cut %v), want %d (cut %v)", tc.n, len(lines), cut, tc.wantLines, tc.cut)
		}
	}
}

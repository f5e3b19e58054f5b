package sandbox

import (
	"context"
	"errors"
	"github.com/writ-fleet/writ/job"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/sal/storage"
	"github.com/writ-fleet/writ/scripts"
	"github.com/writ-fleet/writ/scripts/host"
)

// TestMain doubles as the sandbox process: the Pool under test starts
// this test binary with Env set.
func TestMain(m *testing.M) {
	if IsChild() {
		n, _ := strconv.ParseInt(os.Getenv(Env), 10, 64)
		if err := Main(os.Stdin, os.Stdout, n); err != nil {
			os.Stderr.WriteString("sandbox: " + err.Error() + "\n")
			os.Exit(2)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func testSandbox(t testing.TB, cfg Config) *Pool {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cfg.Command = func() *exec.Cmd { return exec.Command(exe, "-test.run=^$") }
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func TestPool_Run(t *testing.T) {
	fake := storage.NewFake(1 << 30)
	s := testSandbox(t, Config{Size: 2, Modules: host.Modules(host.Layers{Storage: fake})})
	var mu sync.Mutex
	var lines []string
	in := scripts.Input{JobID: "j1", Site: "local", Node: "n1", Attempt: 1, Owner: "alice", Args: []byte(`{"who":"world"}`), Log: func(level, line string) {
		mu.Lock()
		lines = append(lines, level+" "+line)
		mu.Unlock()
	}}
	ctx, cancel := scripts.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := s.Run(ctx, `job := import("job"); log := import("log"); storage := import("storage")
log.info("hello", job.args.who)
v := storage.volume("data", "1G")
w := storage.write("data", "f", bytes("bin\x00ary"))
job.result({id: job.id, vol: v.name, limit: v.limit, wrote: w, back: storage.read("data", "f"), bad: is_error(storage.volume("../x", 0))})`, in)
	if err != nil {
		t.Fatalf("Run = %v", err)
	}
	want := `{"back":"bin\u0000ary","bad":true,"id":"j1","limit":1073741824,"vol":"data","wrote":7}`
	if string(out.Result) != want {
		t.Errorf("Result = %s\nwant     %s", out.Result, want)
	}
	if len(lines) != 1 || lines[0] != "info hello world" {
		t.Errorf("log = %q", lines)
	}
	if _, err := fake.Volume(ctx, "5alice.data"); err != nil {
		t.Errorf("the volume was not made in the runner's layer: %v", err)
	}
}

// TestPool_Stops: every way a script can try to take its process down
// ends in a reason, and the sandbox goes on running jobs.
func TestPool_Stops(t *testing.T) {
	s := testSandbox(t, Config{Size: 1, MaxMemory: 64 << 20, Modules: host.Modules(host.Layers{})})
	for _, tc := range []struct {
		name, script string
		timeout      time.Duration
		want         error
		reason       job.Reason
		msg          string
	}{
		{name: "cyclic compare", script: `a := [1]; a[0] = a; b := [1]; b[0] = b; x := a == b`, want: scripts.ErrStackOverflow},
		{name: "cyclic copy", script: `a := {}; a.x = a; b := copy(a)`, want: scripts.ErrStackOverflow},
		{name: "recursion", script: `f := undefined; f = func(n) { return f(n+1) + 1 }; f(0)`, want: scripts.ErrStackOverflow, msg: "recursion deeper"},
		{name: "range", script: `x := range(0, 100000000)`, want: scripts.ErrMemoryLimit},
		{name: "grow", script: `text := import("text"); a := []; for { a = append(a, text.repeat("x", 100000) + string(len(a))) }`, want: scripts.ErrMemoryLimit},
		{name: "loop", script: `for {}`, timeout: 300 * time.Millisecond, want: scripts.ErrTimeout},
		{name: "exponential compare", script: `a := [1]; b := [1]; for i := 0; i < 40; i++ { a = [a, a]; b = [b, b] }; x := a == b`, timeout: 500 * time.Millisecond, want: scripts.ErrTimeout},
		{name: "small objects", script: `a := []; for { a = append(a, [1, 2, 3]) }`, want: scripts.ErrMemoryLimit},
		{name: "exponential copy", script: `a := [1]; for i := 0; i < 40; i++ { a = [a, a] }; x := copy(a)`, want: scripts.ErrMemoryLimit, msg: "held more than 64 MiB"},
		{name: "host stop", script: `storage := import("storage"); storage.volumes()`, want: scripts.ErrTransient, msg: "no storage pool"},
		{name: "compile", script: `x := (`, reason: job.ReasonScriptInvalid},
		{name: "runtime", script: `x := 1 / 0`, msg: "divide by zero"},
		{name: "fail", script: `job := import("job"); job.fail("no")`, msg: "job.fail: no"},
		{name: "cyclic host arg", script: `storage := import("storage"); a := [1]; a[0] = a; storage.volume(a, 0)`, msg: "contains itself"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := tc.timeout
			if d == 0 {
				d = 30 * time.Second
			}
			ctx, cancel := scripts.WithTimeout(context.Background(), d)
			defer cancel()
			_, err := s.Run(ctx, tc.script, scripts.Input{JobID: "j"})
			switch {
			case err == nil:
				t.Fatal("Run succeeded")
			case tc.want != nil && !errors.Is(err, tc.want):
				t.Fatalf("Run = %v, want %v", err, tc.want)
			case tc.reason != "" && envelope.ReasonOf(err) != tc.reason:
				t.Fatalf("Run = %v, want reason %s", err, tc.reason)
			case !strings.Contains(err.Error(), tc.msg):
				t.Fatalf("Run = %v, want it to mention %q", err, tc.msg)
			}
			// The next job runs.
			ctx2, cancel2 := scripts.WithTimeout(context.Background(), 30*time.Second)
			defer cancel2()
			out, err := s.Run(ctx2, `job := import("job"); job.result(1 + 1)`, scripts.Input{JobID: "next"})
			if err != nil || string(out.Result) != "2" {
				t.Fatalf("next job = %s, %v", out.Result, err)
			}
		})
	}
}

func BenchmarkPool_Hello(b *testing.B) {
	s := testSandbox(b, Config{Size: 2, Modules: host.Modules(host.Layers{})})
	script := `job := import("job"); job.result({hello: job.args.who})`
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := s.Run(context.Background(), script, scripts.Input{JobID: "j", Args: []byte(`{"who":"world"}`)}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestPool_DeadlineThenNext: a child that stopped its job at the
// deadline by itself is not killed later, in the middle of the next job.
func TestPool_DeadlineThenNext(t *testing.T) {
	s := testSandbox(t, Config{Size: 1, Modules: host.Modules(host.Layers{})})
	ctx, cancel := scripts.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := s.Run(ctx, `for {}`, scripts.Input{JobID: "loop"}); !errors.Is(err, scripts.ErrTimeout) {
		t.Fatalf("loop = %v, want ErrTimeout", err)
	}
	ctx2, cancel2 := scripts.WithTimeout(context.Background(), 30*time.Second)
	defer cancel2()
	out, err := s.Run(ctx2, `times := import("times"); job := import("job"); times.sleep(1500 * times.millisecond); job.result("slept")`, scripts.Input{JobID: "next"})
	if err != nil || string(out.Result) != `"slept"` {
		t.Fatalf("the job after = %s, %v", out.Result, err)
	}
}

// BenchmarkEngine_Hello is BenchmarkPool_Hello in process, for the cost
// of the sandbox.
func BenchmarkEngine_Hello(b *testing.B) {
	e := scripts.New(scripts.Config{}, host.Modules(host.Layers{}))
	script := `job := import("job"); job.result({hello: job.args.who})`
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := e.Run(context.Background(), script, scripts.Input{JobID: "j", Args: []byte(`{"who":"world"}`)}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func TestUser(t *testing.T) {
	if os.Geteuid() != 0 {
		if c, why := User("/bin/sh"); c != nil || why != "" {
			t.Fatalf("SandboxUser as a user = %v, %q; want nil and no reason", c, why)
		}
		return
	}
	base := t.TempDir() // and its parent: 0700, made by the testing package
	os.Chmod(base, 0o755)
	os.Chmod(filepath.Dir(base), 0o755)
	dir := filepath.Join(base, "bin")
	os.Mkdir(dir, 0o755)
	open := filepath.Join(dir, "writ")
	closed := filepath.Join(dir, "private")
	os.WriteFile(open, []byte("#!/bin/sh\n"), 0o755)
	os.WriteFile(closed, []byte("#!/bin/sh\n"), 0o700)
	if c, why := User(open); c == nil || c.Uid != NobodyID || c.Gid != NobodyID {
		t.Errorf("SandboxUser(open) = %v, %q; want nobody", c, why)
	}
	if c, why := User(closed); c != nil || !strings.Contains(why, "not readable and executable by others") {
		t.Errorf("SandboxUser(0700) = %v, %q; want nil and why", c, why)
	}
	os.Chmod(dir, 0o700)
	if c, why := User(open); c != nil || !strings.Contains(why, "not searchable") {
		t.Errorf("SandboxUser(in a 0700 dir) = %v, %q; want nil and why", c, why)
	}
}

// TestPool_StepInputs: job.inputs and job.item cross into the sandbox.
func TestPool_StepInputs(t *testing.T) {
	s := testSandbox(t, Config{Size: 1, Modules: host.Modules(host.Layers{})})
	out, err := s.Run(context.Background(), `job := import("job"); job.result([job.inputs.a, job.item])`,
		scripts.Input{JobID: "j", Inputs: []byte(`{"a":[1,2]}`), Item: []byte(`{"k":"v"}`)})
	if err != nil || string(out.Result) != `[[1,2],{"k":"v"}]` {
		t.Fatalf("Run = %s, %v", out.Result, err)
	}
}

package scripts

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
)

// The script engine's entry points under fuzzing (make fuzz): Check, as
// the supervisor and the runner compile, and Sandbox.Run, as the runner
// runs, with small budgets. Neither may crash its process or hang; a run
// may end in any of its stops, but never in an unexplained death of its
// sandbox. testdata/fuzz holds the crashers found (and those of the
// hostile corpus), replayed by every go test.

// fuzzSeeds adds the scripts of lib, the hostile corpus and testdata.
func fuzzSeeds(f *testing.F) {
	for _, glob := range []string{"lib/*.tengo", "../e2e/testdata/hostile/*.tengo"} {
		paths, _ := filepath.Glob(glob)
		for _, p := range paths {
			if b, err := os.ReadFile(p); err == nil {
				f.Add(string(b))
			}
		}
	}
	for _, s := range []string{
		`job := import("job"); job.result(1)`,
		`a := [1]; a[0] = a; job := import("job"); job.result(a)`,
		`x := {a: [1, 2, {b: "c"}]}; y := x == copy(x)`,
		`fmt := import("fmt"); fmt.println(fmt.sprintf("%v %d %s", [1], 2, "x"))`,
		`json := import("json"); x := json.decode(json.encode({a: 1}))`,
		`text := import("text"); x := text.split("a,b", ",")`,
	} {
		f.Add(s)
	}
}

func FuzzCheck(f *testing.F) {
	fuzzSeeds(f)
	e := New(Config{CacheSize: 1}, HostModules(Layers{}))
	f.Fuzz(func(t *testing.T, script string) {
		err := e.Check(script)
		if err != nil && envelope.ReasonOf(err) == "" {
			t.Fatalf("Check = %v, which names no reason", err)
		}
	})
}

var (
	fuzzOnce    sync.Once
	fuzzSandbox *Sandbox
)

func FuzzRun(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, script string) {
		fuzzOnce.Do(func() {
			exe, _ := os.Executable()
			var err error
			fuzzSandbox, err = NewSandbox(SandboxConfig{
				Command:   func() *exec.Cmd { return exec.Command(exe, "-test.run=^$") },
				Size:      2,
				MaxMemory: 32 << 20,
				Modules:   HostModules(Layers{}),
			})
			if err != nil {
				t.Fatal(err)
			}
		})
		const budget = 20 * time.Millisecond
		ctx, cancel := WithTimeout(context.Background(), budget)
		defer cancel()
		start := time.Now()
		_, err := fuzzSandbox.Run(ctx, script, Input{JobID: "fuzz", Owner: "fuzz", Args: []byte(`{"a":1}`)})
		if errors.Is(err, ErrSandbox) {
			t.Fatalf("the sandbox died without a reason: %v", err)
		}
		// A run ends by its deadline, or its sandbox is killed a grace
		// later; a child that must be restarted adds its start.
		if d := time.Since(start); d > budget+killGrace+5*time.Second {
			t.Fatalf("the run took %s", d)
		}
	})
}

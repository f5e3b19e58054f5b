package sandbox

import (
	"context"
	"errors"
	"github.com/writ-fleet/writ/internal/testenv"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/writ-fleet/writ/scripts"
	"github.com/writ-fleet/writ/scripts/host"
)

// A run in a sandbox under fuzzing (make fuzz), as the runner runs, with
// small budgets: it may not crash the runner or hang, and it may end in
// any of its stops, but never in an unexplained death of its sandbox.
// testdata/fuzz holds the crashers found, replayed by every go test.

// fuzzSeeds adds testenv.TengoSeeds.
func fuzzSeeds(f *testing.F) {
	for _, s := range testenv.TengoSeeds("../..") {
		f.Add(s)
	}
}

var (
	fuzzOnce    sync.Once
	fuzzSandbox *Pool
)

func FuzzRun(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, script string) {
		fuzzOnce.Do(func() {
			exe, _ := os.Executable()
			var err error
			fuzzSandbox, err = New(Config{
				Command:   func() *exec.Cmd { return exec.Command(exe, "-test.run=^$") },
				Size:      2,
				MaxMemory: 32 << 20,
				Modules:   host.Modules(host.Layers{}),
			})
			if err != nil {
				t.Fatal(err)
			}
		})
		const budget = 20 * time.Millisecond
		ctx, cancel := scripts.WithTimeout(context.Background(), budget)
		defer cancel()
		start := time.Now()
		_, err := fuzzSandbox.Run(ctx, script, scripts.Input{JobID: "fuzz", Owner: "fuzz", Args: []byte(`{"a":1}`)})
		if errors.Is(err, scripts.ErrSandbox) {
			t.Fatalf("the sandbox died without a reason: %v", err)
		}
		// A run ends by its deadline, or its sandbox is killed a grace
		// later; a child that must be restarted adds its start.
		if d := time.Since(start); d > budget+killGrace+5*time.Second {
			t.Fatalf("the run took %s", d)
		}
	})
}

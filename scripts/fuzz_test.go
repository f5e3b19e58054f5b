package scripts

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/writ-fleet/writ/envelope"
)

// The script engine's entry point under fuzzing (make fuzz): Check, as
// the supervisor and the runner compile (scripts/sandbox fuzzes a run).
// It may not crash its process or hang. testdata/fuzz holds the crashers
// found (and those of the hostile corpus), replayed by every go test.

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
	e := New(Config{CacheSize: 1}, CheckModules())
	f.Fuzz(func(t *testing.T, script string) {
		err := e.Check(script)
		if err != nil && envelope.ReasonOf(err) == "" {
			t.Fatalf("Check = %v, which names no reason", err)
		}
	})
}

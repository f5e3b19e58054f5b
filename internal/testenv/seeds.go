package testenv

import (
	"os"
	"path/filepath"
)

// TengoSeeds are scripts for fuzzing the engine: scripts/lib's, the hostile
// corpus and a few that once broke it. root is the repository's root,
// relative to the test's directory.
func TengoSeeds(root string) []string {
	var out []string
	for _, glob := range []string{"scripts/lib/*.tengo", "e2e/testdata/hostile/*.tengo"} {
		paths, _ := filepath.Glob(filepath.Join(root, glob))
		for _, p := range paths {
			if b, err := os.ReadFile(p); err == nil {
				out = append(out, string(b))
			}
		}
	}
	return append(out,
		`job := import("job"); job.result(1)`,
		`a := [1]; a[0] = a; job := import("job"); job.result(a)`,
		`x := {a: [1, 2, {b: "c"}]}; y := x == copy(x)`,
		`fmt := import("fmt"); fmt.println(fmt.sprintf("%v %d %s", [1], 2, "x"))`,
		`json := import("json"); x := json.decode(json.encode({a: 1}))`,
		`text := import("text"); x := text.split("a,b", ",")`,
		`f := undefined; f = func(n) { return f(n+1) + 1 }; f(0)`,
	)
}

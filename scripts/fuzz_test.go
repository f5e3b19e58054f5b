package scripts

import (
	"github.com/writ-fleet/writ/internal/testenv"
	"testing"

	"github.com/writ-fleet/writ/envelope"
)

// The script engine's entry point under fuzzing (make fuzz): Check, as
// the supervisor and the runner compile (scripts/sandbox fuzzes a run).
// It may not crash its process or hang. testdata/fuzz holds the crashers
// found (and those of the hostile corpus), replayed by every go test.

// fuzzSeeds adds testenv.TengoSeeds.
func fuzzSeeds(f *testing.F) {
	for _, s := range testenv.TengoSeeds("..") {
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

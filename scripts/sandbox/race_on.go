//go:build race

package sandbox

// raceOverhead is what the race detector's own mappings add to a sandbox
// process's data: under -race the data limit grows by this much (the
// tests run so), or the process could not start.
const raceOverhead = 512 << 20

//go:build !race

package sandbox

// raceOverhead: see race_on.go.
const raceOverhead = 0

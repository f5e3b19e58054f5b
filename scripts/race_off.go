//go:build !race

package scripts

// raceOverhead: see race_on.go.
const raceOverhead = 0

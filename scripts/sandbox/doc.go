// Package sandbox runs scripts in a pool of processes (Pool), one job at a
// time each, so that nothing a script does, however much it allocates and
// however it makes Tengo itself fail, reaches the runner.
//
// A child (Main: the writ binary started with Env set) has a data (heap)
// limit in bytes, a smaller stack, a lower priority, no host layers and no
// files, and runs as nobody under a root runner (User). The runner and
// each child talk in frames over the child's stdin and stdout (wire.go):
// the runner sends a run, the child sends log lines, host-layer calls
// (answered by the runner, as the job's owner: package scripts/host) and
// its end. A child that dies, is killed at its deadline or holds too much
// after a run is replaced by a fresh one.
package sandbox

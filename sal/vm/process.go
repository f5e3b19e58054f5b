package vm

import (
	"bytes"
	"context"
	"os"
	"strconv"
	"time"
)

// procStat reads a process's state letter and start time (clock ticks
// after boot, which tells a recycled pid from the process it replaced).
func procStat(pid int) (state byte, start uint64, ok bool) {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, false
	}
	// "pid (comm) S ppid ...": the command may hold spaces and parentheses,
	// so fields are counted after the last ')'. Start time is field 22.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 || i+2 >= len(stat) {
		return 0, 0, false
	}
	fields := bytes.Fields(stat[i+2:])
	if len(fields) < 20 {
		return 0, 0, false
	}
	start, _ = strconv.ParseUint(string(fields[19]), 10, 64)
	return fields[0][0], start, true
}

// processAlive reports whether pid is a live, non-zombie process whose
// command line names a file under dir (so a recycled pid never passes for
// a VM, and neither does another VM whose directory shares a prefix).
func processAlive(pid int, dir string) bool {
	state, _, ok := procStat(pid)
	if !ok || state == 'Z' || state == 'X' {
		return false
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	return bytes.Contains(cmdline, []byte(dir+"/"))
}

// waitGone polls until the process that had start time start has exited
// (gone, a zombie, or its pid reused), or timeout passes; it reports
// whether it exited. A dying process loses its command line before it
// exits, so liveness by command line alone would say "gone" too early.
func waitGone(ctx context.Context, pid int, start uint64, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for {
		state, s, ok := procStat(pid)
		if !ok || state == 'Z' || state == 'X' || s != start {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

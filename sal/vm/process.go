package vm

import (
	"bytes"
	"context"
	"os"
	"strconv"
	"time"
)

// processAlive reports whether pid is a live, non-zombie process whose
// command line names a file under dir (so a recycled pid never passes for
// a VM, and neither does another VM whose directory shares a prefix).
func processAlive(pid int, dir string) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name: "pid (comm) S ...".
	if i := bytes.LastIndexByte(stat, ')'); i < 0 || i+2 >= len(stat) || stat[i+2] == 'Z' || stat[i+2] == 'X' {
		return false
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	return bytes.Contains(cmdline, []byte(dir+"/"))
}

// waitDead polls until the process is gone or timeout passes, and reports
// whether it is gone.
func waitDead(ctx context.Context, pid int, dir string, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for processAlive(pid, dir) {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// Package reaper collects zombie processes that no code of this process
// waits for: the orphans a child subreaper (or PID 1) inherits.
//
// A hypervisor daemonizes (QEMU's -daemonize forks twice), so the process
// that ends up running a VM is not a child writ waits for. Under a child
// subreaper those processes, and their dead intermediates, become this
// process's children; Run reaps the ones that stay zombies. Children that
// some code waits for (an exec.Cmd) are reaped by that code the moment they
// exit, so Run takes only zombies that have stayed zombies across two of its
// scans: nobody is waiting for them.
package reaper

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultInterval is how often Run scans for zombies.
const DefaultInterval = time.Second

// Subreap makes this process a child subreaper (PR_SET_CHILD_SUBREAPER):
// orphans among its descendants become its children instead of PID 1's.
// The returned func turns that off again.
func Subreap() (func(), error) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return nil, err
	}
	return func() { unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) }, nil
}

// Run reaps, until ctx ends, every zombie child of this process that has
// stayed a zombie across two scans interval apart (zero means
// DefaultInterval).
func Run(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		interval = DefaultInterval
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	seen := map[int]bool{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		seen = Once(seen)
	}
}

// Once is one scan: it reaps the zombie children of this process that are
// in seen (found by the scan before) and returns the zombies found now.
func Once(seen map[int]bool) map[int]bool {
	now := map[int]bool{}
	for _, pid := range Zombies() {
		if seen[pid] {
			var ws unix.WaitStatus
			unix.Wait4(pid, &ws, unix.WNOHANG, nil)
			continue
		}
		now[pid] = true
	}
	return now
}

// Reap collects pid at once if it is a zombie child of this process (a
// VM's hypervisor that was killed or died), and does nothing otherwise.
// Use it for processes no exec.Cmd waits for.
func Reap(pid int) {
	if pid <= 0 {
		return
	}
	state, ppid, ok := stat(pid)
	if !ok || state != "Z" || ppid != os.Getpid() {
		return
	}
	// A killed multi-threaded process (QEMU) shows as a zombie while its
	// other threads are still exiting, and cannot be reaped until they have:
	// try for a moment (Run takes it later if that is not enough).
	for deadline := time.Now().Add(reapWait); ; {
		var ws unix.WaitStatus
		if got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); got == pid || err != nil {
			return
		}
		if time.Now().After(deadline) {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// reapWait bounds how long Reap waits for a zombie's threads to exit.
const reapWait = 2 * time.Second

// stat reads a process's state and parent pid from /proc/PID/stat.
func stat(pid int) (state string, ppid int, ok bool) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return "", 0, false
	}
	// The command name is in parentheses and may hold spaces; the state
	// and parent pid follow the last ')'.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 || i+4 >= len(data) {
		return "", 0, false
	}
	fields := strings.Fields(string(data[i+2:]))
	if len(fields) < 2 {
		return "", 0, false
	}
	ppid, err = strconv.Atoi(fields[1])
	return fields[0], ppid, err == nil
}

// Zombies lists the zombie children of this process.
func Zombies() []int {
	self := os.Getpid()
	var out []int
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		pid, err := strconv.Atoi(filepath.Base(p))
		if err != nil {
			continue
		}
		if state, ppid, ok := stat(pid); ok && state == "Z" && ppid == self {
			out = append(out, pid)
		}
	}
	return out
}

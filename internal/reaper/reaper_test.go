package reaper

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// orphan starts a process that forks a child and exits at once, as a
// daemonizing hypervisor does; under Subreap the child becomes this
// process's, and it exits a moment later. It returns the child's pid.
func orphan(t *testing.T) int {
	t.Helper()
	out, err := exec.Command("sh", "-c", "sleep 0.2 & echo $!").Output()
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

func waitZombie(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if state, _, ok := stat(pid); ok && state == "Z" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d did not become this process's zombie", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestReaper(t *testing.T) {
	stop, err := Subreap()
	if err != nil {
		t.Skipf("cannot become a child subreaper: %v", err)
	}
	defer stop()

	// Once takes a zombie only on the second scan that sees it.
	a := orphan(t)
	waitZombie(t, a)
	seen := Once(nil)
	if !seen[a] {
		t.Fatalf("first scan saw %v, want %d", seen, a)
	}
	if _, _, ok := stat(a); !ok {
		t.Fatal("the first scan reaped the zombie; it must wait for a second")
	}
	Once(seen)
	if _, _, ok := stat(a); ok {
		t.Errorf("pid %d is still there after the second scan", a)
	}

	// Reap takes one at once.
	b := orphan(t)
	waitZombie(t, b)
	Reap(b)
	if _, _, ok := stat(b); ok {
		t.Errorf("pid %d is still there after Reap", b)
	}
	if z := Zombies(); len(z) != 0 {
		t.Errorf("zombies left: %v", z)
	}
}

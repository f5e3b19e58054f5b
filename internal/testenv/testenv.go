// Package testenv gives tests real dependencies: a redis-server on a free
// port, and skips for missing privileges or binaries. Everything it starts is
// stopped by t.Cleanup, also when the test fails.
package testenv

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/writ-fleet/writ/internal/redisproc"
)

// RequireRoot skips the test unless it runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (run the suite as root, as `make test` and CI do)")
	}
}

// RequireBinary skips the test unless name is on PATH, and returns its path.
func RequireBinary(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("needs %s on PATH (make test installs it)", name)
	}
	return p
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago and
// that it has not returned before in this process.
func FreePort(t testing.TB) int {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	for try := 0; try < 100; try++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		// The kernel may hand the same free port out twice in a row: a
		// fleet whose ledger and supervisor got one port fails. No port
		// goes to two callers of this process.
		if !portsGiven[port] {
			portsGiven[port] = true
			return port
		}
	}
	t.Fatal("no free port not handed out before")
	return 0
}

var (
	portsMu    sync.Mutex
	portsGiven = map[int]bool{} // guarded by portsMu
)

// Redis starts a redis-server on a free port for the test and returns its
// URL. The server and its files are removed when the test ends. It fails
// (not skips) when redis-server is missing: `make test` installs it.
func Redis(t testing.TB) string {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatalf("redis-server not found: run `make test` (it installs redis-server) or apt-get install redis-server")
	}
	dir := t.TempDir()
	var p *redisproc.Process
	var err error
	for try := 0; try < 5; try++ {
		p, err = redisproc.Start(redisproc.Config{Dir: dir, Port: FreePort(t), Log: filepath.Join(dir, "redis.log")})
		if err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	t.Cleanup(func() { p.Stop() })
	return p.URL()
}

// WaitFor polls cond every 10 ms until it returns true or timeout passes,
// then fails the test with what.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Itoa is strconv.Itoa, for building URLs in tests.
func Itoa(i int) string { return strconv.Itoa(i) }

// Addr returns "127.0.0.1:port".
func Addr(port int) string { return fmt.Sprintf("127.0.0.1:%d", port) }

// ProcessRuns reports whether pid is a live process that is not a zombie
// (a daemon's reaper may take a moment to collect it).
func ProcessRuns(pid int) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(stat), ')')
	return i > 0 && i+2 < len(stat) && stat[i+2] != 'Z'
}

// KillUnder SIGKILLs every process whose command line names a file under
// dir: the hypervisors of a test's VM directory, whatever the test did.
func KillUnder(dir string) {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		cmdline, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(cmdline), dir+"/") {
			continue
		}
		if pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p))); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

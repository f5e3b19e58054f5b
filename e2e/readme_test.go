package e2e

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/internal/testenv"
)

// readmeBlocks returns the shell blocks of README.md marked "```sh test",
// in order.
func readmeBlocks(t *testing.T, readme string) []string {
	t.Helper()
	f, err := os.Open(readme)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var blocks []string
	var cur *strings.Builder
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case cur == nil && strings.TrimSpace(line) == "```sh test":
			cur = &strings.Builder{}
		case cur != nil && strings.TrimSpace(line) == "```":
			blocks = append(blocks, cur.String())
			cur = nil
		case cur != nil:
			cur.WriteString(line + "\n")
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if cur != nil {
		t.Fatal("README.md: a ```sh test block is not closed")
	}
	return blocks
}

// readmeScript turns the README's test blocks into one bash script, run
// as a user would type them into one shell: it stops at the first command
// that fails, and a line whose comment is "# → TEXT" must print TEXT
// (unless TEXT elides something with "..." or "…"). subst replaces
// placeholders; each replacement is said in the test's log.
func readmeScript(t *testing.T, blocks []string, subst map[string]string) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("set -euo pipefail\n")
	for i, block := range blocks {
		fmt.Fprintf(&b, "echo '### README block %d' >&2\n", i+1)
		for _, line := range strings.Split(strings.TrimRight(block, "\n"), "\n") {
			for from, to := range subst {
				if strings.Contains(line, from) {
					t.Logf("README block %d: %s is %s here", i+1, from, to)
					line = strings.ReplaceAll(line, from, to)
				}
			}
			cmd, want, ok := strings.Cut(line, "# → ")
			want = strings.TrimSpace(want)
			if !ok || strings.HasSuffix(strings.TrimSpace(cmd), "\\") || strings.TrimSpace(cmd) == "" ||
				strings.Contains(want, "...") || strings.Contains(want, "…") || strings.Contains(want, "'") {
				b.WriteString(line + "\n")
				continue
			}
			fmt.Fprintf(&b, "echo %s >&2\nout=$(%s)\nprintf '%%s\\n' \"$out\"\n", shellQuote("$ "+strings.TrimSpace(cmd)), strings.TrimSpace(cmd))
			fmt.Fprintf(&b, "case \"$out\" in *%s*) ;; *) echo %s >&2; exit 1;; esac\n",
				shellQuote(want), shellQuote("README: "+strings.TrimSpace(cmd)+" did not print "+want))
		}
	}
	return b.String()
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// TestReadme_Tour runs the README as a new user would on an ordinary
// machine: `make dev` in a fresh work tree, then every "sh test" block in
// order in one shell (hello, a volume, a network, a secret, cancel, a
// flow, and the VM walkthrough with make guest and curl on the host's own
// address), all inside a network namespace shaped like a real host
// (default routes for both families, a docker bridge, a second NIC), so
// the README and the code cannot drift apart.
func TestReadme_Tour(t *testing.T) {
	if testing.Short() {
		t.Skip("slow (builds writ and the guest, boots a VM under TCG): skipped under -short")
	}
	testenv.Guest(t) // root, QEMU, and the guest kernel in the cache make guest uses
	for _, b := range []string{"mkfs.btrfs", "curl", "make", "nsenter"} {
		testenv.RequireBinary(t, b)
	}
	t.Parallel()
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	// A work tree of the repository's files (linked), with its own bin/
	// and .dev/, outside the test's temporary directory so that the pool
	// is unmounted before it goes.
	work, err := os.MkdirTemp("", "writ-readme-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		testenv.KillUnder(work)
		unmountUnder(work)
		os.RemoveAll(work)
	})
	if err := os.Chmod(work, 0o755); err != nil { // sandboxes run as nobody
		t.Fatal(err)
	}
	entries, err := os.ReadDir(repo)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		switch e.Name() {
		case ".dev", "bin", ".git", "image":
			continue
		}
		if err := os.Symlink(filepath.Join(repo, e.Name()), filepath.Join(work, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	host := testenv.HostNS(t)
	nsenter := func(args ...string) *exec.Cmd {
		c := exec.Command("nsenter", append([]string{"--net=" + testenv.NetNSPath(host)}, args...)...)
		c.Dir = work
		c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		return c
	}

	// make dev, as the README's first command says.
	dev := nsenter("make", "dev")
	var devOut lockedBuffer
	dev.Stdout, dev.Stderr = &devOut, &devOut
	if err := dev.Start(); err != nil {
		t.Fatal(err)
	}
	devDone := make(chan error, 1)
	go func() { devDone <- dev.Wait() }()
	t.Cleanup(func() {
		// Ctrl-C, as the README says, then whatever is left.
		syscall.Kill(-dev.Process.Pid, syscall.SIGINT)
		select {
		case <-devDone:
		case <-time.After(30 * time.Second):
			t.Errorf("make dev did not stop within 30 s of Ctrl-C")
			syscall.Kill(-dev.Process.Pid, syscall.SIGKILL)
			<-devDone
		}
	})
	testenv.WaitFor(t, 10*time.Minute, "make dev: the fleet up and the sample job's result", func() bool {
		select {
		case err := <-devDone:
			devDone <- err
			t.Fatalf("make dev ended: %v\n%s", err, tail(devOut.String(), 6000))
		default:
		}
		out := devOut.String()
		return strings.Contains(out, "writ dev fleet is up") && strings.Contains(out, `"greeting": "hello, writ dev"`)
	})

	script := readmeScript(t, readmeBlocks(t, filepath.Join(repo, "README.md")), map[string]string{
		"NODE-ADDRESS": testenv.HostAddr.String(),
	})
	tour := nsenter("bash", "-c", script)
	tour.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var out lockedBuffer
	tour.Stdout, tour.Stderr = &out, &out
	err = runFor(tour, 15*time.Minute)
	t.Logf("the README's tour:\n%s", tail(out.String(), 20000))
	if err != nil {
		t.Fatalf("the README's tour failed: %v\nmake dev's end:\n%s", err, tail(devOut.String(), 4000))
	}
	for _, want := range []string{"hello from a writ guest", `"greeting": "hello, you"`, "cancelled", `"double": 6`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("the README's tour printed no %q", want)
		}
	}
}

// runFor runs cmd and kills it after d.
func runFor(cmd *exec.Cmd, d time.Duration) error {
	if err := cmd.Start(); err != nil {
		return err
	}
	timer := time.AfterFunc(d, func() { cmd.Process.Kill() })
	defer timer.Stop()
	return cmd.Wait()
}

// unmountUnder detaches every mount below dir (a pool a killed writ dev
// left mounted).
func unmountUnder(dir string) {
	data, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return
	}
	for _, l := range strings.Split(string(data), "\n") {
		if f := strings.Fields(l); len(f) > 1 && strings.HasPrefix(f[1], dir+"/") {
			unix.Unmount(f[1], unix.MNT_DETACH)
		}
	}
}

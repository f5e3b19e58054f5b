package e2e

import (
	"bufio"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/writ-fleet/writ/internal/testenv"
)

// guideBlock is a README block marked "```sh guide:MACHINE".
type guideBlock struct {
	host  string
	lines []string // commands, continuation lines joined
}

func guideBlocks(t *testing.T, readme string) []guideBlock {
	t.Helper()
	f, err := os.Open(readme)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []guideBlock
	var cur *guideBlock
	var pending string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		trim := strings.TrimSpace(line)
		switch {
		case cur == nil && strings.HasPrefix(trim, "```sh guide:"):
			cur = &guideBlock{host: strings.TrimPrefix(trim, "```sh guide:")}
		case cur != nil && trim == "```":
			out = append(out, *cur)
			cur = nil
		case cur != nil:
			if strings.HasSuffix(line, "\\") {
				pending += strings.TrimSuffix(line, "\\") + " "
				continue
			}
			line = pending + line
			pending = ""
			if s := strings.TrimSpace(line); s != "" && !strings.HasPrefix(s, "#") {
				cur.lines = append(cur.lines, line)
			}
		}
	}
	if cur != nil {
		t.Fatal("README.md: a ```sh guide block is not closed")
	}
	return out
}

// guideDaemon reports whether a guide command runs a service (started in
// the background, as an operator would under systemd).
func guideDaemon(cmd string) bool {
	f := strings.Fields(envPrefix.ReplaceAllString(cmd, ""))
	if len(f) == 0 {
		return false
	}
	if f[0] == "redis-server" {
		return true
	}
	if f[0] != "writ" || len(f) < 2 {
		return false
	}
	switch f[1] {
	case "supervisor", "coord":
		return true
	case "ledger":
		return len(f) > 2 && f[2] == "serve"
	case "node":
		return len(f) > 2 && strings.HasPrefix(f[2], "--")
	}
	return false
}

// envPrefix matches a command's leading VAR=value assignments, a value
// being a word or a $(command).
var envPrefix = regexp.MustCompile(`^\s*([A-Za-z_][A-Za-z0-9_]*=(\$\([^)]*\)|\S*)\s+)*`)

var listenFlag = regexp.MustCompile(`--listen\s+(\S+)`)

// TestReadme_OperatorGuide builds a fleet of separate processes on
// separate hosts (network namespaces with the guide's addresses) with the
// operator guide's own commands, as written: a CA and certificates, two
// Redis servers from writ redis conf, the ledger, sites and users, the
// site's supervisor (a dispatcher), coord, two nodes on one machine, and a
// job through it all. /etc and /var/lib/writ move under a temporary
// directory and the enrollment token is the one the guide made; the test
// says each substitution. Then the central Redis is restarted from another
// working directory and still holds the job.
func TestReadme_OperatorGuide(t *testing.T) {
	if testing.Short() {
		t.Skip("slow (a whole fleet on five hosts): skipped under -short")
	}
	testenv.RequireRoot(t)
	for _, b := range []string{"redis-server", "curl", "nsenter"} {
		testenv.RequireBinary(t, b)
	}
	t.Parallel()
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	work, err := os.MkdirTemp("", "writ-guide-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	os.Chmod(work, 0o755)
	for _, d := range []string{"etc/writ", "etc/redis", "var/lib/writ"} {
		if err := os.MkdirAll(filepath.Join(work, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(filepath.Join(repo, "scripts"), filepath.Join(work, "scripts")); err != nil {
		t.Fatal(err)
	}

	// The machines of the guide's table, one LAN, default routes through
	// its gateway.
	hn := newHostNet(t)
	const gw = "10.0.255.254"
	if err := testenv.InNetNS(t, hn.sw, func() error {
		br, err := netlink.LinkByName("lan")
		if err != nil {
			return err
		}
		a, _ := netlink.ParseAddr(gw + "/16")
		return netlink.AddrAdd(br, a)
	}); err != nil {
		t.Fatal(err)
	}
	for name, addr := range map[string]string{"central": "10.0.0.1", "site": "10.0.1.1", "node": "10.0.2.1", "admin": "10.0.3.1"} {
		hn.hosts[name] = testenv.PlugGuest(t, hn.sw, "v-"+name, "lan", netip.MustParsePrefix(addr+"/16"), netip.MustParseAddr(gw))
		hn.addrs[name] = addr
	}

	// The environment of a fresh shell: writ on PATH, none of the test's
	// WRIT_ variables (WRIT_CA above all: the guide must say --ca itself).
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "WRIT_") || strings.HasPrefix(kv, "PATH=") {
			continue
		}
		env = append(env, kv)
	}
	env = append(env, "PATH="+filepath.Dir(writBin)+":"+os.Getenv("PATH"))

	subst := []struct{ from, to string }{
		{"/etc/", work + "/etc/"},
		{"/var/lib/writ", work + "/var/lib/writ"},
	}
	for _, s := range subst {
		t.Logf("guide: %s is %s here", s.from, s.to)
	}
	preamble := map[string]string{} // exports per host, as a shell keeps them
	type daemon struct {
		host, cmd string
		c         *exec.Cmd
	}
	var daemons []daemon
	shell := func(host, cmd string) *exec.Cmd {
		c := exec.Command("nsenter", "--net="+testenv.NetNSPath(hn.hosts[host]), "bash", "-c", "set -euo pipefail\n"+preamble[host]+cmd)
		c.Dir, c.Env = work, env
		c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		return c
	}
	startDaemon := func(host, cmd string) *exec.Cmd {
		t.Helper()
		c := shell(host, cmd) // its process group goes at cleanup
		var out lockedBuffer
		c.Stdout, c.Stderr = &out, &out
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { c.Wait(); close(done) }()
		t.Cleanup(func() {
			syscall.Kill(-c.Process.Pid, syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(15 * time.Second):
				syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
				<-done
			}
			if t.Failed() {
				t.Logf("---- %s: %s ----\n%s", host, firstLine(cmd), tail(out.String(), 4000))
			}
		})
		// Ready when it listens: --listen, or a Redis configuration's port.
		addr := ""
		if m := listenFlag.FindStringSubmatch(cmd); m != nil {
			addr = m[1]
		} else if f := strings.Fields(cmd); f[0] == "redis-server" {
			conf, _ := os.ReadFile(f[1])
			var bind, port string
			for _, l := range strings.Split(string(conf), "\n") {
				if v, ok := strings.CutPrefix(l, "bind "); ok {
					bind = strings.Fields(v)[0]
				}
				if v, ok := strings.CutPrefix(l, "tls-port "); ok {
					port = v
				}
			}
			addr = net.JoinHostPort(bind, port)
		}
		if addr != "" {
			testenv.WaitFor(t, time.Minute, host+": "+addr+" listening", func() bool {
				select {
				case <-done:
					t.Fatalf("%s: %s ended:\n%s", host, firstLine(cmd), tail(out.String(), 4000))
				default:
				}
				return dialIn(t, hn.hosts[host], addr)
			})
		}
		return c
	}

	token := ""
	jobID := ""
	for i, b := range guideBlocks(t, filepath.Join(repo, "README.md")) {
		if _, ok := hn.hosts[b.host]; !ok {
			t.Fatalf("README guide block %d names machine %q, not one of the guide's", i+1, b.host)
		}
		for _, line := range b.lines {
			for _, s := range subst {
				line = strings.ReplaceAll(line, s.from, s.to)
			}
			if strings.Contains(line, "writ-enroll-…") {
				if token == "" {
					t.Fatalf("guide: %q needs a token, and no step made one", line)
				}
				t.Logf("guide: writ-enroll-… is the token the guide made")
				line = strings.ReplaceAll(line, "writ-enroll-…", token)
			}
			cmd, want, _ := strings.Cut(line, "# → ")
			cmd, want = strings.TrimSpace(cmd), strings.TrimSpace(want)
			if guideDaemon(cmd) {
				t.Logf("guide %s$ %s   (a service: started in the background)", b.host, cmd)
				daemons = append(daemons, daemon{b.host, cmd, startDaemon(b.host, cmd)})
				continue
			}
			out, err := shell(b.host, cmd).CombinedOutput()
			t.Logf("guide %s$ %s\n%s", b.host, cmd, tail(string(out), 2000))
			if err != nil {
				t.Fatalf("guide block %d on %s: %s: %v", i+1, b.host, cmd, err)
			}
			if want != "" && !strings.Contains(string(out), want) {
				t.Fatalf("guide block %d on %s: %s printed no %q", i+1, b.host, cmd, want)
			}
			if strings.HasPrefix(cmd, "export ") {
				preamble[b.host] += cmd + "\n"
			}
			if m := regexp.MustCompile(`writ-enroll-\S+`).FindString(string(out)); m != "" && strings.Contains(cmd, "token create") {
				token = m
			}
			if m := regexp.MustCompile(`● job ([0-9a-f]{64})`).FindStringSubmatch(string(out)); m != nil {
				jobID = m[1]
			}
		}
		if strings.Contains(strings.Join(b.lines, "\n"), "writ ca issue") {
			// "Copy ca.crt to every machine, and each service its own
			// NAME.crt and NAME.key": the machines share this directory.
			t.Logf("guide: ca/*.crt and ca/*.key (not ca.key) copied beside the commands, every machine's working directory")
			copyCerts(t, work)
		}
	}
	if jobID == "" {
		t.Fatal("the guide ran no job")
	}
	admin := func(args string) string {
		out, err := shell("admin", args).CombinedOutput()
		if err != nil {
			t.Fatalf("admin$ %s: %v\n%s", args, err, out)
		}
		return string(out)
	}
	testenv.WaitFor(t, time.Minute, "both nodes online", func() bool {
		return strings.Count(admin("writ node ls --site lab"), "online") == 2
	})

	// coord's Redis restarted from another working directory keeps every
	// job: its configuration names where its data lives.
	central := strings.TrimSpace(admin("ls " + work + "/etc/redis/writ-central.conf"))
	for _, d := range daemons {
		if d.host == "central" && strings.HasPrefix(d.cmd, "redis-server") {
			syscall.Kill(-d.c.Process.Pid, syscall.SIGTERM)
			testenv.WaitFor(t, 30*time.Second, "coord's Redis stopped", func() bool { return !dialIn(t, hn.hosts["central"], "10.0.0.1:6379") })
		}
	}
	again := exec.Command("nsenter", "--net="+testenv.NetNSPath(hn.hosts["central"]), "redis-server", central)
	again.Dir = "/"
	again.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := again.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { again.Process.Signal(syscall.SIGTERM); again.Wait() })
	testenv.WaitFor(t, time.Minute, "alice's job after coord's Redis restarted from /", func() bool {
		out, err := shell("admin", "WRIT_COORD=https://10.0.0.1:7702 writ job get "+jobID+" --key alice.key").CombinedOutput()
		return err == nil && strings.Contains(string(out), "succeeded")
	})
}

// copyCerts copies the CA's certificates and keys from work/ca to work,
// where the guide's commands name them.
func copyCerts(t *testing.T, work string) {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(work, "ca", "*"))
	for _, f := range files {
		if !strings.HasSuffix(f, ".crt") && !strings.HasSuffix(f, ".key") || filepath.Base(f) == "ca.key" {
			continue
		}
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(work, filepath.Base(f)), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// dialIn reports whether a TCP connection to addr opens from inside ns.
func dialIn(t *testing.T, ns netns.NsHandle, addr string) bool {
	ok := false
	testenv.InNetNS(t, ns, func() error {
		c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
		if err == nil {
			c.Close()
			ok = true
		}
		return nil
	})
	return ok
}

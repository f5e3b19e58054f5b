package e2e

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/guest"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/scripts/sandbox"
)

// Limits the hostile corpus runs under, and what the test holds the
// runner to.
const (
	hostileScriptMemory = 128 << 20
	// runnerRSSMargin: the runner itself (its sandboxes aside) stays under
	// this while the corpus runs; it holds no script's values.
	runnerRSSMargin = 256 << 20
)

// hostileCase is one script of testdata/hostile: what it tries, and the
// reason (and a piece of the error) it must end with. "// want: a|b"
// accepts either reason: which cap a script meets first may depend on the
// build (the race detector makes every object larger).
type hostileCase struct {
	name, what, reason, msg, script string
}

func loadHostile(t *testing.T) []hostileCase {
	t.Helper()
	paths, err := filepath.Glob("testdata/hostile/*.tengo")
	if err != nil {
		t.Fatal(err)
	}
	var out []hostileCase
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		c := hostileCase{name: strings.TrimSuffix(filepath.Base(p), ".tengo"), script: string(b)}
		sc := bufio.NewScanner(strings.NewReader(c.script))
		for sc.Scan() {
			line := sc.Text()
			if v, ok := strings.CutPrefix(line, "// hostile: "); ok {
				c.what = v
			}
			if v, ok := strings.CutPrefix(line, "// want: "); ok {
				c.reason, c.msg, _ = strings.Cut(v, " ")
			}
		}
		if c.what == "" || c.reason == "" {
			t.Fatalf("%s: want a // hostile: and a // want: line", p)
		}
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// TestFleet_Hostile runs the hostile corpus (testdata/hostile) as a
// deployer, mallory, against a real node as root: a btrfs pool, networks in
// a namespace, QEMU under TCG, and another tenant, victim, with a running
// VM. Each script must end with its reason; the runner and supervisor keep
// their PIDs and the next job runs; the runner's memory stays bounded; the
// only hypervisor is victim's and it opens nothing outside writ's pool and
// state; the node gains no link, address, route or rule outside writ's
// pool; the host file mallory hands to vm.create is unchanged.
func TestFleet_Hostile(t *testing.T) {
	slow(t)
	art := testenv.Guest(t)
	testenv.RequireBinary(t, "mkfs.btrfs")
	cases := loadHostile(t)
	if len(cases) < 40 {
		t.Fatalf("the corpus has %d scripts, want at least 40", len(cases))
	}
	t.Parallel()

	poolDir, mnt := tempPool(t)
	node := testenv.HostNS(t)
	f := newFleet(t)
	vmDir := filepath.Join(f.dir, "vms")
	t.Cleanup(func() { testenv.KillUnder(vmDir) })
	mallory := f.addUser("mallory", map[string]string{"local": "deployer"})
	victim := f.addUser("victim", map[string]string{"local": "deployer"})
	sup := f.startSupervisor("local")
	f.startCoord()

	// The node has a subnet of its own inside writ's address pool, and a
	// process listening on a port of the forward range.
	nodeSubnet := netip.MustParsePrefix("10.200.0.0/24")
	var busy net.Listener
	if err := testenv.InNetNS(t, node, func() error {
		d := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "node0"}} // no dummy module here
		if err := netlink.LinkAdd(d); err != nil {
			return err
		}
		addr, _ := netlink.ParseAddr("10.200.0.1/24")
		if err := netlink.AddrAdd(d, addr); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(d); err != nil {
			return err
		}
		var err error
		busy, err = net.Listen("tcp", "0.0.0.0:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	busyPort := busy.Addr().(*net.TCPAddr).Port

	// Images: the guest, and a redirect to the ledger (a loopback service
	// the runner's --image-allow does not cover: only the image server is
	// allowed).
	disk := filepath.Join(f.dir, "disk.img")
	if err := guest.WriteDisk(disk, guestPage, 64<<20); err != nil {
		t.Fatal(err)
	}
	urls, sums := imageServer(t, map[string]string{"disk.img": disk, "vmlinuz": art.Kernel, "initrd.img": art.Initrd})
	redirect := httptest.NewServer(http.RedirectHandler(f.ledger+"/v1/openapi.yaml", http.StatusFound))
	defer redirect.Close()
	imageHost := strings.TrimPrefix(urls["disk.img"], "http://")
	imageHost = imageHost[:strings.IndexByte(imageHost, '/')]
	redirectHost := strings.TrimPrefix(redirect.URL, "http://")

	runner := f.start("runner:vm1", "runner", "--site", "local", "--node", "vm1", "--redis", f.redis, "--ledger", f.ledger, "--listen", "",
		"--concurrency", "2", "--trust-ttl", "1s", "--script-memory", strconv.Itoa(hostileScriptMemory>>20)+"M",
		"--pool-file", filepath.Join(poolDir, "pool.img"), "--pool-size", "2G", "--pool-mount", mnt,
		"--image-allow", imageHost, "--image-allow", redirectHost,
		"--net-ns", testenv.NetNSPath(node), "--net-state", filepath.Join(f.dir, "net"),
		"--vm-dir", vmDir, "--vm-accel", "tcg")

	ctx := context.Background()
	submit := func(k *keys.Key, name, script string, args map[string]any, timeout time.Duration) *job.Record {
		t.Helper()
		j := envelope.NewJob(name, script, "local", time.Now())
		j.Node = "vm1"
		j.Timeout = envelope.Duration(timeout)
		if args != nil {
			j.Args, _ = json.Marshal(args)
		}
		rep, err := f.client().Submit(ctx, rawEnvelope(t, j, k))
		var re *coord.RejectedError
		if errors.As(err, &re) {
			return &job.Record{State: job.StateRejected, Reason: re.Reply.Reason, Error: re.Reply.Error}
		}
		if err != nil {
			t.Fatalf("%s: submit: %v", name, err)
		}
		return f.waitJob(rep.ID, timeout+2*time.Minute)
	}

	// victim deploys a VM: the other tenant, and the one hypervisor.
	lib, err := os.ReadFile("../scripts/lib/deploy_vm.tengo")
	if err != nil {
		t.Fatal(err)
	}
	dep := submit(victim, "deploy", string(lib), map[string]any{
		"name": "web", "image_url": urls["disk.img"], "image_sha256": sums["disk.img"],
		"kernel_url": urls["vmlinuz"], "kernel_sha256": sums["vmlinuz"], "initrd_url": urls["initrd.img"], "initrd_sha256": sums["initrd.img"],
		"cmdline": guest.Cmdline, "subnet": "10.89.0.0/24", "forwards": "8080:80", "memory": "256M",
	}, 5*time.Minute)
	if dep.State != job.StateSucceeded {
		t.Fatalf("victim's deploy: %s %s %s", dep.State, dep.Reason, dep.Error)
	}
	var victimVM struct {
		Pid     int    `json:"pid"`
		Address string `json:"address"`
		Tap     string `json:"tap"`
	}
	json.Unmarshal(dep.Result, &victimVM)
	vols := submit(victim, "volumes", `storage := import("storage"); job := import("job"); job.result(storage.volumes())`, nil, time.Minute)
	var victimVols []struct{ Name, Path string }
	json.Unmarshal(vols.Result, &victimVols)
	if len(victimVols) != 1 || victimVols[0].Path == "" || victimVM.Pid == 0 || victimVM.Tap == "" {
		t.Fatalf("victim's VM %s, volumes %s", dep.Result, vols.Result)
	}

	// What mallory will hand to vm.create: a host file.
	canary := filepath.Join(f.dir, "canary")
	if err := os.WriteFile(canary, []byte("the host's own file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	canarySum := fileSum(t, canary)
	// A kernel mallory may use: a cached image.
	kj := submit(mallory, "kernel", `storage := import("storage"); job := import("job"); job.result(storage.image(job.args.url, job.args.sha).path)`,
		map[string]any{"url": urls["vmlinuz"], "sha": sums["vmlinuz"]}, time.Minute)
	var kernel string
	if json.Unmarshal(kj.Result, &kernel); kernel == "" {
		t.Fatalf("mallory's kernel: %s %s %s", kj.State, kj.Result, kj.Error)
	}
	before := nodeState(t, node)
	runnerPid, supPid := runner.cmd.Process.Pid, sup.cmd.Process.Pid
	args := map[string]any{
		"canary": canary, "pool": mnt, "kernel": kernel, "kernel_url": urls["vmlinuz"],
		"victim_disk": filepath.Join(victimVols[0].Path, "disk.img"), "victim_tap": victimVM.Tap, "victim_addr": victimVM.Address,
		"node_subnet": nodeSubnet.String(), "busy_port": busyPort, "ledger": f.ledger, "redirect": redirect.URL,
	}

	// Sample the runner's memory, and its sandboxes', while the corpus runs.
	mem := &memSampler{pid: runnerPid, exe: writBin, sandboxUIDs: map[string]bool{}}
	stopSampling := mem.start()

	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			timeout := 20 * time.Second
			switch {
			case strings.HasPrefix(c.name, "time-") || strings.HasPrefix(c.name, "exp-compare"):
				timeout = 2 * time.Second
			case strings.Contains(c.reason, "memory_limit"):
				// A sandbox is niced: on a machine busy with other
				// work (CI runs test packages side by side, and the
				// victim's guest runs under TCG) it gets a tenth of a
				// core, and takes that much longer to fill its memory.
				// Its deadline must not come first.
				timeout = 2 * time.Minute
			}
			j := submit(mallory, c.name, c.script, args, timeout)
			if j.State == job.StateSucceeded || !slices.Contains(strings.Split(c.reason, "|"), string(j.Reason)) || !strings.Contains(j.Error, c.msg) {
				t.Errorf("%s (%s): %s %s %q; want reason %s mentioning %q", c.name, c.what, j.State, j.Reason, j.Error, c.reason, c.msg)
			}
			if strings.Contains(j.Error, sums["vmlinuz"]) {
				t.Errorf("%s: the error tells what was fetched: %s", c.name, j.Error)
			}
			// The runner and the supervisor are the same processes, and
			// the next job runs.
			if p := runner.cmd.Process.Pid; p != runnerPid || !testenv.ProcessRuns(p) {
				t.Fatalf("the runner is gone (pid %d)", runnerPid)
			}
			if !testenv.ProcessRuns(supPid) {
				t.Fatalf("the supervisor is gone (pid %d)", supPid)
			}
			if next := submit(mallory, "next", `job := import("job"); job.result("alive")`, nil, time.Minute); next.State != job.StateSucceeded {
				t.Fatalf("the job after %s: %s %s %s", c.name, next.State, next.Reason, next.Error)
			}
		})
	}
	stopSampling()

	t.Logf("%d hostile scripts; runner RSS peak %d MiB (bound %d MiB); sandbox RSS peak %d MiB (script limit %d MiB)",
		len(cases), mem.runnerPeak>>20, runnerRSSMargin>>20, mem.sandboxPeak>>20, hostileScriptMemory>>20)
	if len(mem.sandboxUIDs) != 1 || !mem.sandboxUIDs[strconv.Itoa(sandbox.NobodyID)] {
		t.Errorf("the sandboxes ran as UIDs %v, want only nobody (%d)", mem.sandboxUIDs, sandbox.NobodyID)
	}
	if mem.runnerPeak > runnerRSSMargin {
		t.Errorf("the runner's RSS reached %d MiB, over its bound of %d MiB", mem.runnerPeak>>20, runnerRSSMargin>>20)
	}
	limit := int64(2*hostileScriptMemory + 96<<20)
	if raceEnabled {
		limit += 512 << 20 // the race detector's own (scripts/race_on.go)
	}
	if mem.sandboxPeak > limit {
		t.Errorf("a sandbox's RSS reached %d MiB, over its data limit of %d MiB", mem.sandboxPeak>>20, limit>>20)
	}
	if got := fileSum(t, canary); got != canarySum {
		t.Errorf("the host file handed to vm.create changed")
	}
	// mallory sees no VM of victim's; the admin sees it, with its owner.
	if l := submit(mallory, "vms", `vm := import("vm"); job := import("job"); job.result(vm.list())`, nil, time.Minute); string(l.Result) != "[]" {
		t.Errorf("mallory's vm.list = %s %s, want []", l.State, l.Result)
	}
	out, err := exec.Command(writBin, "vm", "ls", "vm1", "--coord", f.coord, "--key", filepath.Join(f.dir, "admin.key"), "--site", "local").Output()
	if err != nil || !regexp.MustCompile(`(?m)^victim/web\s+victim\s+running`).Match(out) {
		t.Errorf("the admin's writ vm ls = %v\n%s", err, out)
	}
	// The only hypervisor is victim's, and it opens nothing of the host
	// but writ's pool and VM state.
	qemus := qemuUnder(t, vmDir)
	if len(qemus) != 1 || qemus[0] != victimVM.Pid {
		t.Errorf("hypervisors %v, want only victim's (pid %d)", qemus, victimVM.Pid)
	}
	for _, pid := range qemus {
		for _, p := range openPaths(t, pid) {
			if !strings.HasPrefix(p, mnt+"/") && !strings.HasPrefix(p, vmDir+"/") && !hypervisorDevice(p) {
				t.Errorf("hypervisor %d opened %s, outside writ's pool and state", pid, p)
			}
		}
	}
	// The node gained nothing outside writ's pool.
	after := nodeState(t, node)
	pool := netip.MustParsePrefix("10.0.0.0/8")
	linkLocal := netip.MustParsePrefix("fe80::/10") // IPv6 gives every link one
	for l := range after.links {
		if !before.links[l] && !strings.HasPrefix(l, "wb") && !strings.HasPrefix(l, "wt") {
			t.Errorf("new link %s is not writ's", l)
		}
	}
	for _, set := range []map[string]bool{after.addrs, after.routes} {
		for a := range set {
			if before.addrs[a] || before.routes[a] {
				continue
			}
			p, err := netip.ParsePrefix(a)
			if err == nil && linkLocal.Overlaps(p) && p.Bits() >= linkLocal.Bits() {
				continue
			}
			if err != nil || !pool.Overlaps(p) || p.Bits() < pool.Bits() {
				t.Errorf("new address or route %s is outside writ's pool %s", a, pool)
			}
		}
	}
	if after.foreignRules != before.foreignRules {
		t.Errorf("nftables outside writ's table changed:\nbefore %s\nafter  %s", before.foreignRules, after.foreignRules)
	}

	// victim is disabled; the admin stops what it still runs. mallory's
	// own try stops nothing of victim's.
	stopOwner := func(key string) (string, error) {
		out, err := exec.Command(writBin, "vm", "stop-owner", "victim", "vm1", "--coord", f.coord, "--key", key, "--site", "local").CombinedOutput()
		return string(out), err
	}
	malloryKey := filepath.Join(f.dir, "mallory.key")
	if err := mallory.Save(malloryKey); err != nil {
		t.Fatal(err)
	}
	if out, err := stopOwner(malloryKey); err != nil || !strings.Contains(out, "stopped 0 VMs of victim") || !testenv.ProcessRuns(victimVM.Pid) {
		t.Errorf("mallory's writ vm stop-owner victim: %v\n%s", err, out)
	}
	if _, err := f.lc.SetDisabled(ctx, "victim", true); err != nil {
		t.Fatal(err)
	}
	if out, err := stopOwner(filepath.Join(f.dir, "admin.key")); err != nil || !strings.Contains(out, "stopped 1 VMs of victim") || !strings.Contains(out, "removed 1 forwards") {
		t.Errorf("the admin's writ vm stop-owner victim: %v\n%s", err, out)
	}
	testenv.WaitFor(t, 30*time.Second, "victim's QEMU to stop", func() bool { return !testenv.ProcessRuns(victimVM.Pid) })
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// memSampler keeps the peak RSS of a runner and of its sandbox processes
// (its children running exe with no arguments).
type memSampler struct {
	pid                     int
	exe                     string
	mu                      sync.Mutex
	runnerPeak, sandboxPeak int64
	sandboxUIDs             map[string]bool // the real UIDs the sandboxes ran as
}

func (m *memSampler) start() (stop func()) {
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
			}
			r := procStatus(m.pid, "VmHWM")
			var sb int64
			for _, c := range childrenOf(m.pid) {
				if cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", c)); strings.TrimRight(string(cmd), "\x00") == m.exe {
					sb = max(sb, procStatus(c, "VmHWM"))
					if uid := procField(c, "Uid"); uid != "" {
						m.mu.Lock()
						m.sandboxUIDs[strings.Fields(uid)[0]] = true
						m.mu.Unlock()
					}
				}
			}
			m.mu.Lock()
			m.runnerPeak, m.sandboxPeak = max(m.runnerPeak, r), max(m.sandboxPeak, sb)
			m.mu.Unlock()
		}
	}()
	return func() { close(done); <-stopped }
}

// procStatus reads a kB field of /proc/PID/status, in bytes.
func procStatus(pid int, field string) int64 {
	n, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(procField(pid, field), "kB")), 10, 64)
	return n << 10
}

// procField reads a field of /proc/PID/status ("" when it cannot).
func procField(pid int, field string) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

func childrenOf(pid int) []int {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	var out []int
	for _, task := range tasks {
		b, _ := os.ReadFile(task)
		for _, f := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(f); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}

// qemuUnder lists the QEMU processes whose command line names dir.
func qemuUnder(t *testing.T, dir string) []int {
	t.Helper()
	var out []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		args := strings.Split(string(b), "\x00")
		if len(args) == 0 || !strings.Contains(filepath.Base(args[0]), "qemu-system") || !strings.Contains(string(b), dir) {
			continue
		}
		n, _ := strconv.Atoi(strings.Split(p, "/")[2])
		out = append(out, n)
	}
	return out
}

// openPaths are the files a process has open, and those its command line
// names (file=… options and paths).
func openPaths(t *testing.T, pid int) []string {
	t.Helper()
	var out []string
	fds, _ := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", pid))
	for _, fd := range fds {
		if l, err := os.Readlink(fd); err == nil && strings.HasPrefix(l, "/") {
			out = append(out, l)
		}
	}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	for _, a := range strings.Split(string(b), "\x00")[1:] {
		for _, opt := range strings.Split(a, ",") {
			opt = strings.TrimPrefix(opt, "file=")
			opt = strings.TrimPrefix(opt, "path=")
			if strings.HasPrefix(opt, "/") {
				out = append(out, opt)
			}
		}
	}
	return out
}

// hypervisorDevice: the devices a QEMU may hold.
func hypervisorDevice(p string) bool {
	switch p {
	case "/dev/null", "/dev/net/tun", "/dev/kvm", "/dev/urandom", "/dev/random", "/dev/ptmx", "/dev/zero":
		return true
	}
	return strings.HasPrefix(p, "/dev/pts/")
}

// netState is what a namespace has: link names, addresses and routes (as
// prefixes), and the nftables rules of tables other than writ's.
type netState struct {
	links, addrs, routes map[string]bool
	foreignRules         string
}

func nodeState(t *testing.T, h netns.NsHandle) netState {
	t.Helper()
	s := netState{links: map[string]bool{}, addrs: map[string]bool{}, routes: map[string]bool{}}
	err := testenv.InNetNS(t, h, func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			s.links[l.Attrs().Name] = true
		}
		addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if p, ok := netip.AddrFromSlice(a.IP); ok {
				ones, _ := a.Mask.Size()
				s.addrs[netip.PrefixFrom(p.Unmap(), ones).String()] = true
			}
		}
		routes, err := netlink.RouteList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, r := range routes {
			if r.Dst != nil {
				s.routes[r.Dst.String()] = true
			} else {
				s.routes["default"] = true
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("nsenter", "--net="+testenv.NetNSPath(h), "nft", "list", "ruleset").CombinedOutput()
	if err == nil {
		var foreign []string
		inWrit := false
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(l, "table ") {
				inWrit = strings.HasPrefix(l, "table inet writ")
			}
			if !inWrit {
				foreign = append(foreign, l)
			}
		}
		s.foreignRules = strings.Join(foreign, "\n")
	}
	return s
}

package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/identity"
	"github.com/writ-fleet/writ/internal/guest"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/sal/network"
)

const guestPage = "hello from a writ guest\n"

// imageServer serves files over local HTTP and returns the URL and sha256
// of each.
func imageServer(t *testing.T, files map[string]string) (map[string]string, map[string]string) {
	t.Helper()
	urls, sums := map[string]string{}, map[string]string{}
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	for name, path := range files {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(data)
		sums[name] = hex.EncodeToString(sum[:])
		urls[name] = srv.URL + "/" + name
		p := path
		mux.HandleFunc("/"+name, func(w http.ResponseWriter, r *http.Request) { http.ServeFile(w, r, p) })
	}
	return urls, sums
}

// TestFleet_DeployVM is the headline run: a signed deploy_vm.tengo
// submitted with writ run boots a real guest (QEMU, TCG) on a node with a
// btrfs pool and a network namespace; the guest configures its network
// from the cloud-init seed and is reached through the port forward. The
// runner is killed and re-attaches; QEMU is killed and restarted; a guest
// that keeps dying ends failed; destroy_vm.tengo leaves nothing behind.
func TestFleet_DeployVM(t *testing.T) {
	slow(t)
	art := testenv.Guest(t)
	testenv.RequireBinary(t, "mkfs.btrfs")
	t.Parallel()

	poolDir, mnt := tempPool(t)
	node := testenv.HostNS(t)
	f := newFleet(t)
	vmDir := filepath.Join(f.dir, "vms")
	t.Cleanup(func() { testenv.KillUnder(vmDir) }) // runs before the fleet stops
	f.startSupervisor("local")
	f.startCoord()
	runnerArgs := []string{"runner", "--site", "local", "--node", "vm1", "--redis", f.redis, "--ledger", f.ledger, "--listen", "",
		"--pool-file", filepath.Join(poolDir, "pool.img"), "--pool-size", "2G", "--pool-mount", mnt, "--image-allow", "127.0.0.1/32",
		"--net-ns", testenv.NetNSPath(node), "--net-state", filepath.Join(f.dir, "net"),
		"--vm-dir", vmDir, "--vm-accel", "tcg"}
	f.start("runner:vm1", runnerArgs...)

	disk := filepath.Join(f.dir, "disk.img")
	if err := guest.WriteDisk(disk, guestPage, 64<<20); err != nil {
		t.Fatal(err)
	}
	urls, sums := imageServer(t, map[string]string{"disk.img": disk, "vmlinuz": art.Kernel, "initrd.img": art.Initrd})
	writ := func(args ...string) ([]byte, error) {
		args = append(args, "--coord", f.coord, "--key", filepath.Join(f.dir, "admin.key"), "--site", "local")
		cmd := exec.Command(writBin, args...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return out, &cmdError{err, stderr.String()}
		}
		return out, nil
	}
	deployArgs := func(name, cmdline string, extra ...string) []string {
		return append([]string{"run", "../scripts/lib/deploy_vm.tengo", "--node", "vm1", "--timeout", "5m",
			"--arg", "name=" + name, "--arg", "image_url=" + urls["disk.img"], "--arg", "image_sha256=" + sums["disk.img"],
			"--arg", "kernel_url=" + urls["vmlinuz"], "--arg", "kernel_sha256=" + sums["vmlinuz"],
			"--arg", "initrd_url=" + urls["initrd.img"], "--arg", "initrd_sha256=" + sums["initrd.img"],
			"--arg", "cmdline=" + cmdline, "--arg", "subnet=10.89.0.0/24"}, extra...)
	}
	type deployed struct {
		State   string `json:"state"`
		Pid     int    `json:"pid"`
		Address string `json:"address"`
		Tap     string `json:"tap"`
		MS      struct{ Clone, Network, Boot int64 }
	}
	deploy := func() deployed {
		t.Helper()
		out, err := writ(deployArgs("web", guest.Cmdline, "--arg", "forwards=8080:80", "--arg", "memory=256M")...)
		if err != nil {
			t.Fatalf("writ run deploy_vm.tengo: %v", err)
		}
		var d deployed
		if err := json.Unmarshal(out, &d); err != nil {
			t.Fatalf("result %s: %v", out, err)
		}
		return d
	}
	d := deploy()
	if d.State != "running" || d.Pid == 0 || d.Address != "10.89.0.2" {
		t.Fatalf("deploy result = %+v", d)
	}
	t.Logf("deploy stages: clone %d ms, network %d ms, boot to HTTP %d ms", d.MS.Clone, d.MS.Network, d.MS.Boot)

	// The guest is reached through the port forward, from outside and
	// from the node itself.
	outside := testenv.Uplink(t, node, "up0", netip.MustParsePrefix("192.0.2.1/24"), netip.MustParsePrefix("192.0.2.2/24"))
	serving := func(what string) {
		t.Helper()
		testenv.WaitFor(t, 2*time.Minute, what, func() bool {
			a, err1 := testenv.HTTPGet(t, outside, "192.0.2.1:8080", "/")
			b, err2 := testenv.HTTPGet(t, node, "192.0.2.1:8080", "/")
			return err1 == nil && err2 == nil && a == guestPage && b == guestPage
		})
	}
	serving("the guest to serve through node:8080")

	// Re-running converges on the same VM.
	if again := deploy(); again.Pid != d.Pid || again.Address != d.Address {
		t.Errorf("second deploy = %+v, want pid %d at %s", again, d.Pid, d.Address)
	}
	if out, err := writ("vm", "console", "vm1", "web"); err != nil || !strings.Contains(string(out), "writ-guest: network eth0 10.89.0.2/24 via 10.89.0.1") {
		t.Errorf("writ vm console = %v\n%s", err, out)
	}
	vmInfo := func(name string) (info struct {
		State     string `json:"state"`
		Pid       int    `json:"pid"`
		Restarts  int    `json:"restarts"`
		LastError string `json:"last_error"`
	}) {
		t.Helper()
		out, err := writ("vm", "info", "vm1", name)
		if err != nil {
			t.Fatalf("writ vm info: %v", err)
		}
		if err := json.Unmarshal(out, &info); err != nil {
			t.Fatalf("writ vm info: %s: %v", out, err)
		}
		return info
	}

	// Kill the runner: a new one re-attaches to the same QEMU.
	f.stop(f.procs["runner:vm1"], syscall.SIGKILL)
	f.start("runner:vm1b", runnerArgs...)
	if i := vmInfo("web"); i.Pid != d.Pid || i.State != "running" {
		t.Errorf("after the runner restart: %+v, want pid %d running", i, d.Pid)
	}
	// Kill QEMU: the runner starts it again.
	syscall.Kill(d.Pid, syscall.SIGKILL)
	testenv.WaitFor(t, time.Minute, "a new QEMU", func() bool {
		i := vmInfo("web")
		return i.State == "running" && i.Pid != 0 && i.Pid != d.Pid
	})
	serving("the restarted guest to serve")

	// A guest that keeps dying ends failed, its console tail visible.
	if _, err := writ(deployArgs("dies", guest.Cmdline+" writ.die")...); err != nil {
		t.Fatalf("deploy the dying guest: %v", err)
	}
	testenv.WaitFor(t, 3*time.Minute, "the dying guest to end failed", func() bool { return vmInfo("dies").State == "failed" })
	if i := vmInfo("dies"); !strings.Contains(i.LastError, "writ-guest: told to die") {
		t.Errorf("failed VM's last error lacks its console tail:\n%s", i.LastError)
	}

	// destroy_vm leaves no process, tap, rule, address, disk or record.
	last := vmInfo("web")
	for _, name := range []string{"web", "dies"} {
		if out, err := writ("run", "../scripts/lib/destroy_vm.tengo", "--node", "vm1", "--arg", "name="+name); err != nil {
			t.Fatalf("destroy %s: %v\n%s", name, err, out)
		}
	}
	if testenv.ProcessRuns(last.Pid) {
		t.Errorf("QEMU pid %d still runs after destroy_vm", last.Pid)
	}
	testenv.InNetNS(t, node, func() error {
		if _, err := netlink.LinkByName(d.Tap); err == nil {
			t.Errorf("tap %s still there after destroy_vm", d.Tap)
		}
		h, err := network.New(network.Config{StateDir: filepath.Join(f.dir, "net")})
		if err != nil {
			return err
		}
		rules, _ := h.Ruleset(t.Context())
		if strings.Contains(rules, "forward tcp 8080") {
			t.Errorf("forward rule left after destroy_vm:\n%s", rules)
		}
		if held, _ := h.Allocations(t.Context(), "vms"); len(held) != 0 {
			t.Errorf("addresses left after destroy_vm: %v", held)
		}
		return nil
	})
	for _, p := range []string{filepath.Join(mnt, "volumes", "web-disk"), filepath.Join(vmDir, "web"), filepath.Join(vmDir, "dies")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s left after destroy_vm (%v)", p, err)
		}
	}
}

type cmdError struct {
	err    error
	stderr string
}

func (e *cmdError) Error() string { return e.err.Error() + "\n" + e.stderr }

// TestFleet_NodeReboot: a node (writ node) runs a VM; the ledger goes
// down, and the node "reboots" twice while it is away: each time every
// process on it is killed, the kernel's links and ruleset are lost, its
// pool unmounted, and writ node starts again with a new boot ID. The VM
// comes back and serves through its forward each time, the ledger still
// down; once the ledger is back the node's queued reports reach it and it
// counts both boots, the one it never heard of live included.
func TestFleet_NodeReboot(t *testing.T) {
	slow(t)
	art := testenv.Guest(t)
	testenv.RequireBinary(t, "mkfs.btrfs")
	t.Parallel()

	poolDir, mnt := tempPool(t)
	node := testenv.HostNS(t)
	f := newFleet(t)
	vmDir := filepath.Join(f.dir, "vms")
	t.Cleanup(func() { testenv.KillUnder(vmDir) })
	token := f.enrollSite(1)
	stateDir := filepath.Join(f.dir, "node")
	nodeArgs := func(boot string) []string {
		bootFile := filepath.Join(f.dir, boot)
		if err := os.WriteFile(bootFile, []byte(boot+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return []string{"node", "--ledger", f.ledger, "--site", "local", "--token", token, "--state-dir", stateDir, "--allow-tmpfs",
			"--redis", f.redis, "--concurrency", "2", "--trust-ttl", "1s", "--boot-id-file", bootFile,
			"--pool-file", filepath.Join(poolDir, "pool.img"), "--pool-size", "2G", "--pool-mount", mnt, "--image-allow", "127.0.0.1/32",
			"--net-ns", testenv.NetNSPath(node), "--net-state", filepath.Join(f.dir, "net"), "--vm-dir", vmDir, "--vm-accel", "tcg"}
	}
	first := f.start("node:boot-1", nodeArgs("boot-1")...)
	id := registeredID(t, first)

	disk := filepath.Join(f.dir, "disk.img")
	if err := guest.WriteDisk(disk, guestPage, 64<<20); err != nil {
		t.Fatal(err)
	}
	urls, sums := imageServer(t, map[string]string{"disk.img": disk, "vmlinuz": art.Kernel, "initrd.img": art.Initrd})
	cmd := exec.Command(writBin, "run", "../scripts/lib/deploy_vm.tengo", "--node", id, "--timeout", "5m",
		"--arg", "name=web", "--arg", "image_url="+urls["disk.img"], "--arg", "image_sha256="+sums["disk.img"],
		"--arg", "kernel_url="+urls["vmlinuz"], "--arg", "kernel_sha256="+sums["vmlinuz"],
		"--arg", "initrd_url="+urls["initrd.img"], "--arg", "initrd_sha256="+sums["initrd.img"],
		"--arg", "cmdline="+guest.Cmdline, "--arg", "subnet=10.89.0.0/24", "--arg", "forwards=8080:80", "--arg", "memory=256M",
		"--coord", f.coord, "--key", filepath.Join(f.dir, "admin.key"), "--site", "local")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("deploy: %v\n%s", err, stderr.String())
	}
	var d struct{ Pid int }
	if err := json.Unmarshal(out, &d); err != nil || d.Pid == 0 {
		t.Fatalf("deploy result %s: %v", out, err)
	}
	outside := testenv.Uplink(t, node, "up0", netip.MustParsePrefix("192.0.2.1/24"), netip.MustParsePrefix("192.0.2.2/24"))
	serving := func(what string) {
		t.Helper()
		testenv.WaitFor(t, 3*time.Minute, what, func() bool {
			page, err := testenv.HTTPGet(t, outside, "192.0.2.1:8080", "/")
			return err == nil && page == guestPage
		})
	}
	serving("the guest to serve through node:8080")
	testenv.WaitFor(t, 30*time.Second, "the first boot's report", func() bool {
		n, err := f.lc.Node(t.Context(), id)
		return err == nil && n.BootID == "boot-1"
	})

	// The ledger goes down; then the node "reboots", twice.
	f.stop(f.procs["ledger"], syscall.SIGKILL)
	running := first
	reboot := func(boot string) *proc {
		t.Helper()
		f.stop(running, syscall.SIGKILL)
		testenv.KillUnder(vmDir)
		testenv.WaitFor(t, 30*time.Second, "QEMU to die", func() bool { return !testenv.ProcessRuns(d.Pid) })
		testenv.InNetNS(t, node, func() error {
			links, err := netlink.LinkList()
			if err != nil {
				return err
			}
			for _, l := range links {
				if name := l.Attrs().Name; name != "lo" && name != "up0" {
					if err := netlink.LinkDel(l); err != nil {
						t.Errorf("delete %s: %v", name, err)
					}
				}
			}
			return nil
		})
		nft, err := nftables.New(nftables.WithNetNSFd(int(node)))
		if err != nil {
			t.Fatal(err)
		}
		nft.FlushRuleset()
		if err := nft.Flush(); err != nil {
			t.Fatalf("flush the node's ruleset: %v", err)
		}
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Fatalf("unmount the pool: %v", err)
		}
		running = f.start("node:"+boot, nodeArgs(boot)...)
		serving("the guest to serve again after the reboot into " + boot + ", the ledger down")
		return running
	}
	queued := func(boot string) bool {
		b, _ := os.ReadFile(filepath.Join(stateDir, identity.QueueFile))
		return strings.Contains(string(b), `"`+boot+`"`)
	}
	reboot("boot-2")
	testenv.WaitFor(t, 30*time.Second, "boot-2's report queued", func() bool { return queued("boot-2") })
	third := reboot("boot-3")
	testenv.WaitFor(t, 30*time.Second, "boot-3's report queued after boot-2's", func() bool { return queued("boot-2") && queued("boot-3") })

	f.start("ledger:again", "ledger", "serve", "--db", filepath.Join(f.dir, "ledger.db"), "--listen", testenv.Addr(f.ports["ledger"]))
	testenv.WaitFor(t, time.Minute, "the ledger to count both boots it missed", func() bool {
		n, err := f.lc.Node(t.Context(), id)
		return err == nil && n.BootID == "boot-3" && n.Boots == 3 && n.Liveness == ledger.LivenessOnline
	})
	log := third.log.String()
	if !strings.Contains(log, "queued uptime report delivered") || !strings.Contains(log, `"boot":"boot-2"`) {
		t.Errorf("boot-3 did not deliver boot-2's queued report:\n%s", tail(log, 3000))
	}
}

// TestFleet_ServiceFlow: scripts/lib/deploy_service.yaml, run with writ
// flow run, deploys a network, a volume and two VMs behind forwards on a
// node, which serve from outside; teardown_service.yaml removes them.
func TestFleet_ServiceFlow(t *testing.T) {
	slow(t)
	art := testenv.Guest(t)
	testenv.RequireBinary(t, "mkfs.btrfs")
	t.Parallel()

	poolDir, mnt := tempPool(t)
	node := testenv.HostNS(t)
	f := newFleet(t)
	vmDir := filepath.Join(f.dir, "vms")
	t.Cleanup(func() { testenv.KillUnder(vmDir) })
	f.startSupervisor("local")
	f.startCoord()
	f.start("runner:vm1", "runner", "--site", "local", "--node", "vm1", "--redis", f.redis, "--ledger", f.ledger, "--listen", "",
		"--concurrency", "2", "--pool-file", filepath.Join(poolDir, "pool.img"), "--pool-size", "2G", "--pool-mount", mnt, "--image-allow", "127.0.0.1/32",
		"--net-ns", testenv.NetNSPath(node), "--net-state", filepath.Join(f.dir, "net"), "--vm-dir", vmDir, "--vm-accel", "tcg")
	disk := filepath.Join(f.dir, "disk.img")
	if err := guest.WriteDisk(disk, guestPage, 64<<20); err != nil {
		t.Fatal(err)
	}
	urls, sums := imageServer(t, map[string]string{"disk.img": disk, "vmlinuz": art.Kernel, "initrd.img": art.Initrd})
	flowRun := func(file string, args ...string) []byte {
		t.Helper()
		cmd := exec.Command(writBin, append([]string{"flow", "run", "../scripts/lib/" + file, "--site", "local",
			"--coord", f.coord, "--key", filepath.Join(f.dir, "admin.key")}, args...)...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("writ flow run %s: %v\n%s", file, err, stderr.String())
		}
		return out
	}
	out := flowRun("deploy_service.yaml",
		"--arg", "image_url="+urls["disk.img"], "--arg", "image_sha256="+sums["disk.img"],
		"--arg", "kernel_url="+urls["vmlinuz"], "--arg", "kernel_sha256="+sums["vmlinuz"],
		"--arg", "initrd_url="+urls["initrd.img"], "--arg", "initrd_sha256="+sums["initrd.img"], "--arg", "cmdline="+guest.Cmdline)
	var res struct {
		Summary []struct {
			VM      string
			Address string
		}
	}
	if err := json.Unmarshal(out, &res); err != nil || len(res.Summary) != 2 {
		t.Fatalf("deploy_service outputs: %s (%v)", out, err)
	}
	outside := testenv.Uplink(t, node, "up0", netip.MustParsePrefix("192.0.2.1/24"), netip.MustParsePrefix("192.0.2.2/24"))
	for _, port := range []string{"8081", "8082"} {
		testenv.WaitFor(t, 2*time.Minute, "a VM to serve on "+port, func() bool {
			page, err := testenv.HTTPGet(t, outside, "192.0.2.1:"+port, "/")
			return err == nil && page == guestPage
		})
	}

	flowRun("teardown_service.yaml")
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), "qemu") && strings.Contains(string(b), vmDir) {
			t.Errorf("a VM process is left after the teardown: %s", strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	testenv.InNetNS(t, node, func() error {
		h, err := network.New(network.Config{StateDir: filepath.Join(f.dir, "net")})
		if err != nil {
			return err
		}
		if nets, _ := h.Networks(t.Context()); len(nets) != 0 {
			t.Errorf("networks after the teardown: %+v", nets)
		}
		return nil
	})
}

package qemu

import (
	"context"
	"github.com/writ-fleet/writ/sal/internal/poolfile"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/writ-fleet/writ/internal/guest"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/sal/network"
	"github.com/writ-fleet/writ/sal/vm"
)

const page = "hello from a writ guest\n"

// rig is a node namespace with a writ network, the test guest, and
// Machines over QEMU (TCG) launching into that namespace.
type rig struct {
	node netns.NsHandle
	host *network.Host
	art  guest.Artifacts
	disk string
	dir  string
	cfg  vm.Config
	m    *vm.Machines
	t    testing.TB
	nets network.Network
	ctx  context.Context
}

func newRig(t testing.TB) *rig {
	t.Helper()
	b, err := New(Config{Accel: AccelTCG})
	if err != nil {
		t.Fatal(err)
	}
	return newRigWith(t, b)
}

// newRigWith is newRig over backend b.
func newRigWith(t testing.TB, b *Backend) *rig {
	art := testenv.Guest(t)
	r := &rig{t: t, art: art, ctx: context.Background(), dir: t.TempDir()}
	r.node = testenv.HostNS(t)
	var err error
	if r.host, err = network.New(network.Config{StateDir: t.TempDir(), NetNS: testenv.NetNSPath(r.node)}); err != nil {
		t.Fatal(err)
	}
	if r.nets, err = r.host.EnsureNetwork(r.ctx, network.Spec{Name: "web", Subnet: netip.MustParsePrefix("10.77.0.0/24")}); err != nil {
		t.Fatal(err)
	}
	r.disk = filepath.Join(t.TempDir(), "disk.img")
	if err := guest.WriteDisk(r.disk, page, 16<<20); err != nil {
		t.Fatal(err)
	}
	r.cfg = vm.Config{Dir: r.dir, Backend: b, Exec: r.host.Do, StopGrace: 2 * time.Second,
		RestartBackoff: 100 * time.Millisecond, CheckInterval: 100 * time.Millisecond}
	r.m = r.machines()
	// Whatever happens, no QEMU outlives the test.
	t.Cleanup(func() {
		m := r.machines()
		list, _ := m.List(context.Background())
		for _, i := range list {
			if i.Pid > 0 {
				syscall.Kill(i.Pid, syscall.SIGKILL)
			}
			m.Delete(context.Background(), i.Name)
		}
	})
	return r
}

func (r *rig) machines() *vm.Machines {
	m, err := vm.New(r.cfg)
	if err != nil {
		r.t.Fatal(err)
	}
	return m
}

func (r *rig) spec(name, cmdline string) vm.Spec {
	nic, err := r.host.Attach(r.ctx, "web", name, 0)
	if err != nil {
		r.t.Fatal(err)
	}
	return vm.Spec{Name: name, CPUs: 1, MemoryMiB: 256, Kernel: poolfile.Make(r.art.Kernel), Initrd: poolfile.Make(r.art.Initrd), Cmdline: cmdline,
		Disks: []vm.Disk{{Path: poolfile.Make(r.disk)}},
		NICs:  []vm.NIC{{Tap: nic.Tap, MAC: nic.MAC, Address: netip.PrefixFrom(nic.Addr, nic.Prefix.Bits()), Gateway: nic.Gateway}}}
}

// serving waits until the guest at addr serves the page.
func (r *rig) serving(addr string, timeout time.Duration) {
	r.t.Helper()
	testenv.WaitFor(r.t, timeout, "the guest to serve HTTP on "+addr, func() bool {
		body, err := testenv.HTTPGet(r.t, r.node, addr+":80", "/")
		return err == nil && body == page
	})
}

func TestMachines_Lifecycle(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM under TCG: skipped under -short (make test runs it)")
	}
	r := newRig(t)
	spec := r.spec("g1", guest.Cmdline)
	if _, err := r.m.Create(r.ctx, spec); err != nil {
		t.Fatal(err)
	}
	info, err := r.m.Start(r.ctx, "g1")
	if err != nil {
		t.Fatalf("Start: %v\nconsole:\n%s", err, consoleOf(r, "g1"))
	}
	addr := spec.NICs[0].Address.Addr().String()
	r.serving(addr, 2*time.Minute)
	if again, err := r.m.Start(r.ctx, "g1"); err != nil || again.Pid != info.Pid {
		t.Errorf("second Start = pid %d, %v; want the same pid %d", again.Pid, err, info.Pid)
	}
	if con, _ := r.m.Console(r.ctx, "g1", 4096); !strings.Contains(con, "writ-guest: network eth0 "+spec.NICs[0].Address.String()) {
		t.Errorf("console lacks the network line:\n%s", con)
	}

	// A restarted runner re-attaches: same pid, never a second QEMU.
	m2 := r.machines()
	if err := m2.Recover(r.ctx); err != nil {
		t.Fatal(err)
	}
	if got, _ := m2.Info(r.ctx, "g1"); got.Pid != info.Pid || got.State != vm.StateRunning {
		t.Fatalf("after Recover: %+v, want pid %d running", got, info.Pid)
	}

	// A killed QEMU is restarted by the watcher.
	ctx, cancel := context.WithCancel(r.ctx)
	done := make(chan error, 1)
	go func() { done <- m2.Run(ctx) }()
	syscall.Kill(info.Pid, syscall.SIGKILL)
	testenv.WaitFor(t, 30*time.Second, "a new QEMU after the kill", func() bool {
		got, _ := m2.Info(r.ctx, "g1")
		return got.Pid != 0 && got.Pid != info.Pid && got.State == vm.StateRunning
	})
	r.serving(addr, 2*time.Minute)
	got, _ := m2.Info(r.ctx, "g1")
	if got.Restarts != 1 {
		t.Errorf("restarts = %d, want 1", got.Restarts)
	}
	cancel()
	<-done

	// Stop: the test guest ignores the power button, so the grace runs
	// out and it is killed.
	start := time.Now()
	stopped, err := m2.Stop(r.ctx, "g1", time.Second)
	if err != nil || stopped.State != vm.StateStopped || stopped.Pid != 0 {
		t.Fatalf("Stop = %+v, %v", stopped, err)
	}
	if took := time.Since(start); took < time.Second {
		t.Errorf("Stop took %s, less than the grace", took)
	}
	if testenv.ProcessRuns(got.Pid) {
		t.Errorf("QEMU pid %d still there after Stop", got.Pid)
	}
	if err := m2.Delete(r.ctx, "g1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(r.dir, "g1")); !os.IsNotExist(err) {
		t.Errorf("VM directory left after Delete: %v", err)
	}
}

// TestMachines_KeepsDying: a guest that powers off as soon as it boots is
// restarted with backoff, then kept failed with its console tail.
func TestMachines_KeepsDying(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM under TCG: skipped under -short (make test runs it)")
	}
	r := newRig(t)
	if _, err := r.m.Create(r.ctx, r.spec("dies", guest.Cmdline+" writ.die")); err != nil {
		t.Fatal(err)
	}
	if _, err := r.m.Start(r.ctx, "dies"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(r.ctx)
	defer cancel()
	go r.m.Run(ctx)
	testenv.WaitFor(t, 3*time.Minute, "the VM to end failed", func() bool {
		i, _ := r.m.Info(r.ctx, "dies")
		return i.State == vm.StateFailed
	})
	i, _ := r.m.Info(r.ctx, "dies")
	if !strings.Contains(i.LastError, "died 3 times") || !strings.Contains(i.LastError, "writ-guest: told to die") || i.Restarts != 2 {
		t.Errorf("failed VM: restarts %d, last error:\n%s", i.Restarts, i.LastError)
	}
	// It stays failed: the watcher does not start it again.
	time.Sleep(500 * time.Millisecond)
	if j, _ := r.m.Info(r.ctx, "dies"); j.State != vm.StateFailed || j.Pid != 0 {
		t.Errorf("after a while: %+v", j)
	}
}

func consoleOf(r *rig, name string) string {
	s, _ := r.m.Console(r.ctx, name, 4096)
	return s
}

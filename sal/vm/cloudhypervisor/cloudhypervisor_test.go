package cloudhypervisor

import (
	"context"
	"github.com/writ-fleet/writ/sal/internal/poolfile"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/writ-fleet/writ/internal/guest"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/sal/network"
	"github.com/writ-fleet/writ/sal/vm"
	"github.com/writ-fleet/writ/sal/vm/qemu"
)

func TestMain(m *testing.M) {
	if os.Getenv(envFake) != "" {
		runFakeVMM()
		return
	}
	os.Exit(m.Run())
}

// fakeBackend returns a Backend whose binary is this test binary, run as
// the fake VMM.
func fakeBackend(t *testing.T, fail string) *Backend {
	t.Helper()
	if _, err := os.Stat(specPath); err != nil {
		t.Fatalf("the contract suite needs the spec at %s (shared/ beside the repository): %v", specPath, err)
	}
	spec, _ := filepath.Abs(specPath)
	t.Setenv(envFake, spec)
	t.Setenv(envFakeFail, fail)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "cloud-hypervisor")
	if err := os.Symlink(self, bin); err != nil {
		t.Fatal(err)
	}
	b, err := New(Config{Binary: bin})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// testSpec is a VM whose files exist (the fake never reads them).
func testSpec(t *testing.T, name string) vm.Spec {
	dir := t.TempDir()
	for _, f := range []string{"vmlinuz", "initrd", "disk.img"} {
		os.WriteFile(filepath.Join(dir, f), []byte(f), 0o644)
	}
	return vm.Spec{Name: name, CPUs: 2, MemoryMiB: 512, Kernel: poolfile.Make(filepath.Join(dir, "vmlinuz")), Initrd: poolfile.Make(filepath.Join(dir, "initrd")),
		Cmdline: "console=ttyS0", Disks: []vm.Disk{{Path: poolfile.Make(filepath.Join(dir, "disk.img"))}}}
}

func requests(t *testing.T, dir string) []string {
	data, _ := os.ReadFile(filepath.Join(dir, "requests.log"))
	return strings.Split(strings.TrimSpace(string(data)), "\n")
}

// TestContract_Lifecycle runs the driver through Machines against the
// fake VMM: launch, re-attach, graceful stop by power button, delete.
// Every request it sends is validated against the spec.
func TestContract_Lifecycle(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	m, err := vm.New(vm.Config{Dir: root, Backend: fakeBackend(t, ""), StopGrace: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if i, err := m.Info(ctx, "ch1"); err == nil && i.Pid > 0 {
			syscall.Kill(i.Pid, syscall.SIGKILL)
		}
	})
	if _, err := m.Create(ctx, testSpec(t, "ch1")); err != nil {
		t.Fatal(err)
	}
	started, err := m.Start(ctx, "ch1")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "ch1")

	// The VM's config as the fake received it.
	api, _ := NewAPI(Socket(dir))
	info, err := api.GetVmInfoWithResponse(ctx)
	if err != nil || info.JSON200 == nil {
		t.Fatalf("vm.info = %v, %v", info, err)
	}
	cfg := info.JSON200.Config
	if info.JSON200.State != "Running" || cfg.Cpus.BootVcpus != 2 || cfg.Memory.Size != 512<<20 || *cfg.Payload.Cmdline != "console=ttyS0" || len(*cfg.Disks) != 2 || !*(*cfg.Disks)[1].Readonly {
		t.Errorf("vm.info = %+v", info.JSON200)
	}

	// A new Machines (a restarted runner) re-attaches to the same process.
	m2, _ := vm.New(vm.Config{Dir: root, Backend: fakeBackend(t, ""), StopGrace: 10 * time.Second})
	if err := m2.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if i, _ := m2.Info(ctx, "ch1"); i.Pid != started.Pid || i.State != vm.StateRunning {
		t.Errorf("after Recover: %+v, want pid %d running", i, started.Pid)
	}

	// Stop presses the power button; the VMM ends with the guest, well
	// inside the grace period.
	t0 := time.Now()
	stopped, err := m2.Stop(ctx, "ch1", 0)
	if err != nil || stopped.State != vm.StateStopped {
		t.Fatalf("Stop = %+v, %v", stopped, err)
	}
	if took := time.Since(t0); took > 5*time.Second {
		t.Errorf("graceful stop took %s", took)
	}
	got := requests(t, dir)
	want := []string{"PUT /vm.create 204", "PUT /vm.boot 204", "GET /vm.info 200", "PUT /vm.power-button 204"}
	var seq []string
	for _, line := range got {
		if strings.HasPrefix(line, "INVALID") {
			t.Errorf("contract breach: %s", line)
		}
		if !strings.HasPrefix(line, "GET /vmm.ping") {
			seq = append(seq, line)
		}
	}
	if strings.Join(seq, "\n") != strings.Join(want, "\n") {
		t.Errorf("requests =\n%s\nwant (after pings)\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if err := m2.Delete(ctx, "ch1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("VM directory left after Delete")
	}
}

// TestContract_Errors: error replies of the spec reach the caller with
// their reason, a failed launch leaves no VMM behind, and a request that
// breaks the spec is refused by the fake (so the suite can fail).
func TestContract_Errors(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	m, _ := vm.New(vm.Config{Dir: root, Backend: fakeBackend(t, "boot")})
	if _, err := m.Create(ctx, testSpec(t, "bad")); err != nil {
		t.Fatal(err)
	}
	_, err := m.Start(ctx, "bad")
	if err == nil || !strings.Contains(err.Error(), "vm.boot: 404") || !strings.Contains(err.Error(), "VM is not created") {
		t.Fatalf("Start with a failing boot = %v", err)
	}
	i, _ := m.Info(ctx, "bad")
	if i.Pid != 0 || i.State != vm.StateRestarting || !strings.Contains(i.LastError, "vm.boot: 404") {
		t.Errorf("after a failed launch: %+v", i)
	}
	if out, _ := exec.Command("pgrep", "-f", filepath.Join(root, "bad")+"/").Output(); len(out) > 0 {
		t.Errorf("a VMM survived the failed launch: pids %s", out)
	}

	// The fake's state machine, and its request validation, directly.
	dir := t.TempDir()
	cmd := exec.Command(fakeBackend(t, "").cfg.Binary, "--api-socket", "path="+Socket(dir))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	api, _ := NewAPI(Socket(dir))
	testenv.WaitFor(t, 10*time.Second, "the fake's API", func() bool {
		r, err := api.GetVmmPingWithResponse(ctx)
		return err == nil && r.StatusCode() == 200
	})
	for _, tc := range []struct {
		name string
		call func() (int, error)
		want int
	}{
		{"boot before create", func() (int, error) { r, err := api.BootVMWithResponse(ctx); return code(r, err) }, http.StatusNotFound},
		{"info before create", func() (int, error) { r, err := api.GetVmInfoWithResponse(ctx); return code(r, err) }, http.StatusNotFound},
		{"create", func() (int, error) {
			r, err := api.CreateVMWithResponse(ctx, BuildConfig(vm.Launch{Spec: testSpec(t, "x"), Dir: dir, Seed: "seed.iso", Console: "c.log"}))
			return code(r, err)
		}, http.StatusNoContent},
		{"power button before boot", func() (int, error) { r, err := api.PowerButtonVMWithResponse(ctx); return code(r, err) }, http.StatusMethodNotAllowed},
		{"a config that breaks the spec", func() (int, error) {
			r, err := api.CreateVMWithBodyWithResponse(ctx, "application/json", strings.NewReader(`{"cpus":{"boot_vcpus":"two","max_vcpus":2},"payload":{}}`))
			return code(r, err)
		}, http.StatusBadRequest},
	} {
		got, err := tc.call()
		if err != nil || got != tc.want {
			t.Errorf("%s: status %d, %v; want %d", tc.name, got, err, tc.want)
		}
	}
	if log := strings.Join(requests(t, dir), "\n"); !strings.Contains(log, "INVALID PUT /api/v1/vm.create") {
		t.Errorf("the fake did not flag the bad request:\n%s", log)
	}
}

func code(r interface{ StatusCode() int }, err error) (int, error) {
	if err != nil {
		return 0, err
	}
	return r.StatusCode(), nil
}

// TestReal_Lifecycle runs the driver against a real cloud-hypervisor with
// the test guest, where the binary and a working KVM exist.
func TestReal_Lifecycle(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath(DefaultBinary); err != nil {
		t.Skip("cloud-hypervisor is not installed (no Debian package; install it from its releases to run this test)")
	}
	if qemuBin, err := exec.LookPath(qemu.DefaultBinary); err != nil || qemu.ProbeAccel(context.Background(), qemuBin) != qemu.AccelKVM {
		t.Skip("KVM does not run guests here (cloud-hypervisor needs it)")
	}
	art := testenv.Guest(t)
	ctx := context.Background()
	node := testenv.HostNS(t)
	host, err := network.New(network.Config{StateDir: t.TempDir(), NetNS: testenv.NetNSPath(node)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := host.EnsureNetwork(ctx, network.Spec{Name: "ch", Subnet: netip.MustParsePrefix("10.78.0.0/24")}); err != nil {
		t.Fatal(err)
	}
	nic, err := host.Attach(ctx, "ch", "real", 0)
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(t.TempDir(), "disk.img")
	guest.WriteDisk(disk, "hello from cloud-hypervisor\n", 16<<20)
	b, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	m, _ := vm.New(vm.Config{Dir: t.TempDir(), Backend: b, Exec: host.Do, StopGrace: 2 * time.Second})
	spec := vm.Spec{Name: "real", Kernel: poolfile.Make(art.Kernel), Initrd: poolfile.Make(art.Initrd), Cmdline: guest.Cmdline, Disks: []vm.Disk{{Path: poolfile.Make(disk)}},
		NICs: []vm.NIC{{Tap: nic.Tap, MAC: nic.MAC, Address: netip.PrefixFrom(nic.Addr, 24), Gateway: nic.Gateway}}}
	if _, err := m.Create(ctx, spec); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Delete(ctx, "real") })
	if _, err := m.Start(ctx, "real"); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, time.Minute, "the guest to serve HTTP", func() bool {
		body, err := testenv.HTTPGet(t, node, nic.Addr.String()+":80", "/")
		return err == nil && strings.Contains(body, "cloud-hypervisor")
	})
}

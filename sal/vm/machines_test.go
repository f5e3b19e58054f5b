package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/writ-fleet/writ/sal/internal/poolfile"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	diskfs "github.com/diskfs/go-diskfs"
	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/internal/reaper"
	"github.com/writ-fleet/writ/internal/testenv"
)

// fakeBackend launches `sleep` processes that name the VM's directory, so
// Machines' liveness, kill and restart logic runs on real processes.
type fakeBackend struct {
	launches int
	fail     error
}

func (f *fakeBackend) Name() string { return "fake" }

func (f *fakeBackend) Launch(ctx context.Context, l Launch) (int, error) {
	if f.fail != nil {
		return 0, f.fail
	}
	f.launches++
	// sh names the directory in its command line and execs nothing else,
	// so the pid is the process that must be watched.
	cmd := exec.Command("sh", "-c", "while :; do sleep 1; done", filepath.Join(l.Dir, "fake"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	go cmd.Wait()
	return cmd.Process.Pid, nil
}

func (f *fakeBackend) Shutdown(ctx context.Context, dir string) error { return nil }

func newMachines(t *testing.T, b Backend) *Machines {
	t.Helper()
	m, err := New(Config{Dir: t.TempDir(), Backend: b, StopGrace: 200 * time.Millisecond, RestartBackoff: 10 * time.Millisecond, CheckInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		list, _ := m.List(context.Background())
		for _, i := range list {
			m.Delete(context.Background(), i.Name)
		}
	})
	return m
}

func spec(t *testing.T, name string) Spec {
	k := filepath.Join(t.TempDir(), "vmlinuz")
	os.WriteFile(k, []byte("kernel"), 0o644)
	return Spec{Name: name, Kernel: poolfile.Make(k)}
}

func TestMachines_CreateValidates(t *testing.T) {
	m := newMachines(t, &fakeBackend{})
	ctx := context.Background()
	good := spec(t, "ok")
	for _, tc := range []struct {
		name string
		edit func(*Spec)
		want string
	}{
		{"bad name", func(s *Spec) { s.Name = "Bad/Name" }, "name"},
		{"no kernel or firmware", func(s *Spec) { s.Kernel = File{} }, "give a kernel"},
		{"missing kernel", func(s *Spec) { s.Kernel = poolfile.Make("/nonexistent/vmlinuz") }, "does not exist"},
		{"too many cpus", func(s *Spec) { s.CPUs = 1000 }, "cpus"},
		{"too little memory", func(s *Spec) { s.MemoryMiB = 8 }, "memory"},
		{"missing disk", func(s *Spec) { s.Disks = []Disk{{Path: poolfile.Make("/nonexistent.img")}} }, "disk"},
		{"NIC without a tap", func(s *Spec) { s.NICs = []NIC{{MAC: "02:00:00:00:00:01"}} }, "tap"},
		{"a host interface as tap", func(s *Spec) { s.NICs = []NIC{{Tap: "lo", MAC: "02:00:00:00:00:01"}} }, "not a tap writ attached"},
		{"options in the tap", func(s *Spec) { s.NICs = []NIC{{Tap: "wt0123456789ab,script=/x", MAC: "02:00:00:00:00:01"}} }, "not a tap writ attached"},
		{"options in the MAC", func(s *Spec) {
			s.NICs = []NIC{{Tap: "wt0123456789ab", MAC: "02:00:00:00:00:01,romfile=/etc/shadow"}}
		}, "not a unicast address"},
		{"multicast MAC", func(s *Spec) { s.NICs = []NIC{{Tap: "wt0123456789ab", MAC: "01:00:5e:00:00:01"}} }, "not a unicast address"},
		{"long MAC", func(s *Spec) { s.NICs = []NIC{{Tap: "wt0123456789ab", MAC: "02:00:00:00:00:00:00:01"}} }, "not a unicast address"},
	} {
		s := good
		tc.edit(&s)
		if _, err := m.Create(ctx, s); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Create = %v, want ErrInvalid mentioning %q", tc.name, err, tc.want)
		}
	}
	if list, _ := m.List(ctx); len(list) != 0 {
		t.Errorf("refused specs left records: %+v", list)
	}
	info, err := m.Create(ctx, good)
	if err != nil || info.Spec.CPUs != DefaultCPUs || info.Spec.MemoryMiB != DefaultMemoryMiB || info.State != StateStopped {
		t.Fatalf("Create = %+v, %v", info, err)
	}
	// The seed is an ISO 9660 image labelled cidata with the three files.
	d, err := diskfs.Open(filepath.Join(m.dir("ok"), "seed.iso"), diskfs.WithOpenMode(diskfs.ReadOnly))
	if err != nil {
		t.Fatal(err)
	}
	fs, err := d.GetFilesystem(0)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimRight(fs.Label(), "\x00 "); got != "cidata" {
		t.Errorf("seed label = %q, want cidata", got)
	}
	files, err := fs.ReadDir(".")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range files {
		names = append(names, f.Name())
	}
	if strings.Join(names, ",") != "meta-data,network-config,user-data" {
		t.Errorf("seed files = %v", names)
	}
	d.Close()
}

func TestMachines_StartStopConflict(t *testing.T) {
	b := &fakeBackend{}
	m := newMachines(t, b)
	ctx := context.Background()
	s := spec(t, "v1")
	m.Create(ctx, s)
	first, err := m.Start(ctx, "v1")
	if err != nil || first.Pid == 0 || first.State != StateRunning {
		t.Fatalf("Start = %+v, %v", first, err)
	}
	again, _ := m.Start(ctx, "v1")
	if again.Pid != first.Pid || b.launches != 1 {
		t.Errorf("a second Start launched again: pid %d (was %d), %d launches", again.Pid, first.Pid, b.launches)
	}
	other := s
	other.CPUs = 2
	if _, err := m.Create(ctx, other); !errors.Is(err, ErrConflict) {
		t.Errorf("Create with another spec while running = %v, want ErrConflict", err)
	}
	stopped, err := m.Stop(ctx, "v1", 0)
	if err != nil || stopped.State != StateStopped || processAlive(first.Pid, m.dir("v1")) {
		t.Errorf("Stop = %+v, %v (the fake ignores the power button: it must be killed)", stopped, err)
	}
	if _, err := m.Create(ctx, other); err != nil {
		t.Errorf("Create with another spec while stopped = %v", err)
	}
	if _, err := m.Info(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Info of a missing VM = %v", err)
	}
	if err := m.Delete(ctx, "nope"); err != nil {
		t.Errorf("Delete of a missing VM = %v", err)
	}
}

// TestMachines_Watch: a dead VM is restarted; one that keeps dying ends
// failed and stays so; a VM whose launch fails is retried.
func TestMachines_Watch(t *testing.T) {
	b := &fakeBackend{}
	m := newMachines(t, b)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	m.Create(ctx, spec(t, "w"))
	first, _ := m.Start(ctx, "w")
	go m.Run(ctx)
	pid := first.Pid
	for death := 1; death <= DefaultMaxDeaths; death++ {
		syscall.Kill(pid, syscall.SIGKILL)
		deadline := time.Now().Add(10 * time.Second)
		for {
			i, _ := m.Info(ctx, "w")
			if death < DefaultMaxDeaths && i.State == StateRunning && i.Pid != pid && i.Pid != 0 {
				pid = i.Pid
				break
			}
			if death == DefaultMaxDeaths && i.State == StateFailed {
				if !strings.Contains(i.LastError, "died 3 times") || i.Restarts != 2 {
					t.Errorf("failed VM = %+v", i)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("death %d: VM = %+v", death, i)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	time.Sleep(100 * time.Millisecond)
	if i, _ := m.Info(ctx, "w"); i.State != StateFailed || b.launches != 3 {
		t.Errorf("after failing: %+v, %d launches; want it left failed after 3", i, b.launches)
	}
	// An explicit Start clears the failed state.
	if i, err := m.Start(ctx, "w"); err != nil || i.State != StateRunning {
		t.Errorf("Start after failed = %+v, %v", i, err)
	}

	// A launch that fails is recorded and retried by the watcher.
	b2 := &fakeBackend{fail: errors.New("no such tap")}
	m2 := newMachines(t, b2)
	m2.Create(ctx, spec(t, "f"))
	if _, err := m2.Start(ctx, "f"); err == nil || !strings.Contains(err.Error(), "no such tap") {
		t.Fatalf("Start with a failing launch = %v", err)
	}
	b2.fail = nil
	go m2.Run(ctx)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if i, _ := m2.Info(ctx, "f"); i.State == StateRunning && i.Pid != 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the watcher did not retry a failed launch")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestSeedFiles_Quoted(t *testing.T) {
	s := Spec{Name: "x", NICs: []NIC{{Tap: "t", MAC: "02:00:00:00:00:01"}}, CloudInit: CloudInit{SSHKeys: []string{"ssh-ed25519 AAAA key\"\nruncmd: [evil]"}}}
	user := seedFiles(s)["user-data"]
	if strings.Contains(user, "\nruncmd:") {
		t.Errorf("an SSH key broke out of its YAML string:\n%s", user)
	}
}

// runMachines runs m's watcher until the test ends and returns a context
// for the test's calls.
func runMachines(t *testing.T, m *Machines) context.Context {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return ctx
}

// daemonFailBackend fails every launch the way a hypervisor that
// daemonizes does: the launcher forks a process that outlives it and then
// dies, and reports an error. It records when each launch happened.
type daemonFailBackend struct {
	mu       sync.Mutex
	launches []time.Time
}

func (f *daemonFailBackend) Name() string { return "fake" }

func (f *daemonFailBackend) Launch(ctx context.Context, l Launch) (int, error) {
	f.mu.Lock()
	f.launches = append(f.launches, time.Now())
	f.mu.Unlock()
	// The subshell is orphaned when sh exits and dies a moment later: under
	// a child subreaper it becomes this process's zombie.
	out, err := exec.Command("sh", "-c", "(sleep 0.01; exit 1) & echo 'kvm_buf_set_msrs: Assertion failed'; exit 1").CombinedOutput()
	return 0, fmt.Errorf("qemu: %v: %s", err, strings.TrimSpace(string(out)))
}

func (f *daemonFailBackend) Shutdown(ctx context.Context, dir string) error { return nil }

// TestMachines_FailedLaunches: ten failed launches back off as documented
// (RestartBackoff doubling per failure), end in the failed state with the
// launch's error, and leave no zombie behind.
func TestMachines_FailedLaunches(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: skipped under -short (make test runs it)")
	}
	b := &daemonFailBackend{}
	const base = 20 * time.Millisecond
	m, err := New(Config{Dir: t.TempDir(), Backend: b, MaxDeaths: 10, RestartBackoff: base, CheckInterval: 5 * time.Millisecond, ReapInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx := runMachines(t, m)
	if _, err := m.Create(ctx, spec(t, "doomed")); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Start(ctx, "doomed"); err == nil || !strings.Contains(err.Error(), "kvm_buf_set_msrs") {
		t.Fatalf("Start = %v, want the launch error", err)
	}
	var info Info
	testenv.WaitFor(t, time.Minute, "the VM to end failed", func() bool {
		info, _ = m.Info(ctx, "doomed")
		return info.State == StateFailed
	})
	if !strings.Contains(info.LastError, "kvm_buf_set_msrs") || !strings.Contains(info.LastError, "10 times") {
		t.Errorf("LastError = %q, want the launch error and the count", info.LastError)
	}
	b.mu.Lock()
	launches := append([]time.Time(nil), b.launches...)
	b.mu.Unlock()
	if len(launches) != 10 {
		t.Fatalf("%d launches, want 10", len(launches))
	}
	for i := 1; i < len(launches); i++ {
		want := base << (i - 1)
		if gap := launches[i].Sub(launches[i-1]); gap < want {
			t.Errorf("launch %d came %s after the one before, want at least %s (the backoff)", i+1, gap, want)
		}
	}
	time.Sleep(100 * time.Millisecond) // the watcher keeps running: no launch may follow
	if b.mu.Lock(); len(b.launches) != 10 {
		t.Errorf("%d launches after failing, want 10", len(b.launches))
	}
	b.mu.Unlock()
	testenv.WaitFor(t, 10*time.Second, "the dead launchers to be reaped", func() bool {
		return len(reaper.Zombies()) == 0
	})
}

// TestMachines_Use: VMs meant to run count, stopped ones do not.
func TestMachines_Use(t *testing.T) {
	m := newMachines(t, &fakeBackend{})
	ctx := context.Background()
	a, b := spec(t, "a"), spec(t, "b")
	a.CPUs, a.MemoryMiB, b.CPUs, b.MemoryMiB = 2, 512, 1, 256
	for _, s := range []Spec{a, b} {
		if _, err := m.Create(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := m.Start(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if cpus, mem, err := m.Use(ctx); err != nil || cpus != 2 || mem != 512 {
		t.Errorf("Use = %d CPUs, %d MiB, %v; want 2, 512 (only the started VM)", cpus, mem, err)
	}
}

// daemonBackend launches the way QEMU's -daemonize does: the launcher forks
// the VM's process and exits, so the process is nobody's child but the
// subreaper's.
type daemonBackend struct{}

func (daemonBackend) Name() string { return "fake" }

func (daemonBackend) Launch(ctx context.Context, l Launch) (int, error) {
	out, err := exec.Command("sh", "-c", `(exec sh -c 'while :; do sleep 1; done' "$0" </dev/null >/dev/null 2>&1) & echo $!`, filepath.Join(l.Dir, "fake")).Output()
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(out)))
}

func (daemonBackend) Shutdown(ctx context.Context, dir string) error { return nil }

// TestMachines_StopReaps: a daemonized VM process that is stopped is
// reaped at once, not left a zombie.
func TestMachines_StopReaps(t *testing.T) {
	m, err := New(Config{Dir: t.TempDir(), Backend: daemonBackend{}, StopGrace: 100 * time.Millisecond, CheckInterval: time.Hour, ReapInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx := runMachines(t, m)
	testenv.WaitFor(t, 5*time.Second, "Run to become a subreaper", func() bool {
		var v int32
		unix.Prctl(unix.PR_GET_CHILD_SUBREAPER, uintptr(unsafe.Pointer(&v)), 0, 0, 0)
		return v == 1
	})
	if _, err := m.Create(ctx, spec(t, "d")); err != nil {
		t.Fatal(err)
	}
	info, err := m.Start(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Stop(ctx, "d", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", info.Pid)); err == nil {
		data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", info.Pid))
		t.Errorf("pid %d is still there after Stop: %s", info.Pid, data)
	}
}

// TestSpec_FilesOnlyFromThePool: a VM's files are vm.File, which nothing
// outside sal/ can make from a string: decoding a spec with a host path
// fails, while a record Machines wrote reads back with its paths.
func TestSpec_FilesOnlyFromThePool(t *testing.T) {
	for _, doc := range []string{`{"kernel": "/dev/sda"}`, `{"disks": [{"path": "/etc/shadow"}]}`, `{"firmware": "/boot/efi.img"}`} {
		var s Spec
		if err := json.Unmarshal([]byte(doc), &s); err == nil {
			t.Errorf("json.Unmarshal(%s) into a Spec = nil error, %+v: a path became a File", doc, s)
		}
	}
	in := record{Spec: Spec{Name: "a", Kernel: poolfile.Make("/pool/images/x/disk.img"), Disks: []Disk{{Path: poolfile.Make("/pool/volumes/v/disk.img"), ReadOnly: true}}}}
	data, err := json.Marshal(&in)
	if err != nil {
		t.Fatal(err)
	}
	var out record
	if err := json.Unmarshal(data, &out); err != nil {
		t.Fatal(err)
	}
	if out.Spec.Kernel.Path() != "/pool/images/x/disk.img" || len(out.Spec.Disks) != 1 || out.Spec.Disks[0].Path.Path() != "/pool/volumes/v/disk.img" || !out.Spec.Disks[0].ReadOnly {
		t.Errorf("record read back = %+v", out.Spec)
	}
}

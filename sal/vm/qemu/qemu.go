// Package qemu is the QEMU backend of sal/vm: one qemu-system-x86_64
// process per VM (daemonized, in its own session), a QMP socket for control
// (github.com/digitalocean/go-qemu/qmp), virtio disks and NICs, the serial
// console appended to a file, and direct kernel or firmware boot.
//
// Acceleration is KVM or TCG; "auto" probes whether KVM really runs a guest
// under the options real VMs get (a bounded boot of a probe that reaches
// 64-bit mode with paging, probe.S) and uses TCG otherwise; a KVM launch
// that fails after a good probe falls back to TCG too.
package qemu

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/digitalocean/go-qemu/qmp"

	"github.com/writ-fleet/writ/sal/vm"
)

// Acceleration choices.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// DefaultBinary is the QEMU system emulator used by default.
const DefaultBinary = "qemu-system-x86_64"

// Config sets up the backend.
type Config struct {
	// Binary defaults to DefaultBinary (looked up on PATH).
	Binary string
	// Accel is AccelAuto (default), AccelKVM or AccelTCG.
	Accel string
	// Log is optional; it says which acceleration auto chose and why.
	Log *slog.Logger
}

// Backend launches VMs with QEMU.
type Backend struct {
	cfg Config
	log *slog.Logger

	mu    sync.Mutex
	accel string // guarded by mu; "" until resolved
}

var _ vm.Backend = (*Backend)(nil)

// New returns the backend; it checks the binary and the accel choice.
func New(cfg Config) (*Backend, error) {
	if cfg.Binary == "" {
		cfg.Binary = DefaultBinary
	}
	if cfg.Accel == "" {
		cfg.Accel = AccelAuto
	}
	switch cfg.Accel {
	case AccelAuto, AccelKVM, AccelTCG:
	default:
		return nil, fmt.Errorf("qemu: accel %q: want auto, kvm or tcg", cfg.Accel)
	}
	bin, err := exec.LookPath(cfg.Binary)
	if err != nil {
		return nil, fmt.Errorf("qemu: %s not found (apt-get install qemu-system-x86): %w", cfg.Binary, err)
	}
	cfg.Binary = bin
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Backend{cfg: cfg, log: log}, nil
}

// Name implements vm.Backend.
func (b *Backend) Name() string { return "qemu" }

// Accel returns the acceleration in use, probing once for "auto".
func (b *Backend) Accel(ctx context.Context) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.accel == "" {
		b.accel = b.cfg.Accel
		if b.accel == AccelAuto {
			start := time.Now()
			b.accel = ProbeAccel(ctx, b.cfg.Binary)
			b.log.Info("qemu: acceleration probed", "accel", b.accel, "took", time.Since(start).Round(time.Millisecond).String())
		}
	}
	return b.accel
}

// machineArgs are the machine and CPU options of every VM, and of the
// probe, so the probe asks KVM for exactly what real VMs need.
func machineArgs(accel string) []string {
	cpu := "max"
	if accel == AccelKVM {
		cpu = "host"
	}
	return []string{"-machine", "q35,accel=" + accel, "-cpu", cpu}
}

// Args returns the QEMU command line for l (without the binary), the same
// one a person would type to run the guest by hand.
func (b *Backend) Args(l vm.Launch, accel string) []string {
	s := l.Spec
	args := append([]string{"-name", "writ-" + s.Name}, machineArgs(accel)...)
	args = append(args,
		"-smp", strconv.Itoa(s.CPUs),
		"-m", strconv.Itoa(s.MemoryMiB),
		"-nodefaults", "-no-user-config", "-display", "none",
		"-chardev", "file,id=console,path="+l.Console+",append=on",
		"-serial", "chardev:console",
		"-qmp", "unix:"+filepath.Join(l.Dir, "qmp.sock")+",server=on,wait=off",
		"-pidfile", filepath.Join(l.Dir, "qemu.pid"),
		"-daemonize",
	)
	if !s.Kernel.IsZero() {
		args = append(args, "-kernel", s.Kernel.Path())
		if !s.Initrd.IsZero() {
			args = append(args, "-initrd", s.Initrd.Path())
		}
		if s.Cmdline != "" {
			args = append(args, "-append", s.Cmdline)
		}
	} else {
		args = append(args, "-bios", s.Firmware.Path())
	}
	for _, d := range s.Disks {
		opt := "file=" + qemuEscape(d.Path.Path()) + ",if=virtio,format=raw"
		if d.ReadOnly {
			opt += ",readonly=on"
		}
		args = append(args, "-drive", opt)
	}
	args = append(args, "-drive", "file="+qemuEscape(l.Seed)+",if=virtio,format=raw,readonly=on")
	for i, n := range s.NICs {
		id := fmt.Sprintf("net%d", i)
		args = append(args, "-netdev", "tap,id="+id+",ifname="+n.Tap+",script=no,downscript=no",
			"-device", "virtio-net-pci,netdev="+id+",mac="+n.MAC)
	}
	return args
}

// qemuEscape doubles commas, QEMU's escape inside option values.
func qemuEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// Launch implements vm.Backend. QEMU daemonizes once the VM is set up, so
// a launch error (a bad disk, a busy tap) comes back here with QEMU's words.
//
// Under "auto", a KVM launch that fails is tried once more under TCG: a
// host whose KVM runs the probe may still refuse a real VM (QEMU aborting
// in kvm_buf_set_msrs has been seen). When TCG works, the backend uses TCG
// from then on and says so in the log; when it fails too, the problem is
// not KVM and the TCG error is returned.
func (b *Backend) Launch(ctx context.Context, l vm.Launch) (int, error) {
	accel := b.Accel(ctx)
	pid, err := b.launch(l, accel)
	if err == nil || accel != AccelKVM || b.cfg.Accel != AccelAuto {
		return pid, err
	}
	pid, terr := b.launch(l, AccelTCG)
	if terr != nil {
		return 0, terr
	}
	b.mu.Lock()
	b.accel = AccelTCG
	b.mu.Unlock()
	b.log.Warn("qemu: a KVM launch failed though KVM passed the probe; falling back to TCG for every VM of this process", "vm", l.Spec.Name, "kvm_error", err.Error())
	return pid, nil
}

func (b *Backend) launch(l vm.Launch, accel string) (int, error) {
	pidfile := filepath.Join(l.Dir, "qemu.pid")
	os.Remove(pidfile)
	os.Remove(filepath.Join(l.Dir, "qmp.sock"))
	// QEMU is a system tool with no library form: one process per VM.
	cmd := exec.Command(b.cfg.Binary, b.Args(l, accel)...)
	cmd.Dir = l.Dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("qemu (%s): %v: %s", accel, err, strings.TrimSpace(string(out)))
	}
	data, err := os.ReadFile(pidfile)
	if err != nil {
		return 0, fmt.Errorf("qemu: started but wrote no pidfile: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		return 0, fmt.Errorf("qemu: pidfile %s: %w", pidfile, err)
	}
	return pid, nil
}

// Shutdown implements vm.Backend: system_powerdown over QMP (the ACPI
// power button).
func (b *Backend) Shutdown(ctx context.Context, dir string) error {
	_, err := Command(filepath.Join(dir, "qmp.sock"), "system_powerdown")
	return err
}

// Command runs one QMP command on the socket and returns its "return"
// value.
func Command(socket, command string) (json.RawMessage, error) {
	return CommandArgs(socket, command, nil)
}

// CommandArgs runs one QMP command with arguments (nil for none).
func CommandArgs(socket, command string, args any) (json.RawMessage, error) {
	mon, err := qmp.NewSocketMonitor("unix", socket, 2*time.Second)
	if err != nil {
		return nil, fmt.Errorf("qemu: qmp %s: %w", socket, err)
	}
	if err := mon.Connect(); err != nil {
		return nil, fmt.Errorf("qemu: qmp connect: %w", err)
	}
	defer mon.Disconnect()
	req, err := json.Marshal(struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
	}{command, args})
	if err != nil {
		return nil, err
	}
	raw, err := mon.Run(req)
	if err != nil {
		return nil, fmt.Errorf("qemu: qmp %s: %w", command, err)
	}
	var reply struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Class, Desc string
		} `json:"error"`
	}
	if err := json.Unmarshal(raw, &reply); err != nil {
		return nil, fmt.Errorf("qemu: qmp %s reply: %w", command, err)
	}
	if reply.Error != nil {
		return nil, fmt.Errorf("qemu: qmp %s: %s: %s", command, reply.Error.Class, reply.Error.Desc)
	}
	return reply.Return, nil
}

// probeTimeout bounds the KVM probe: a working KVM runs the probe guest in
// well under a second; a broken one hangs.
// (Here TCG runs it in 0.6 s; a KVM slower than several times that is of
// no use either.)
const probeTimeout = 3 * time.Second

// probeSector is probe.S assembled (see there for what it does and how to
// rebuild it): a boot sector that reaches 64-bit mode with paging, writes
// 32 MiB, loops 200 million times and writes 1 to isa-debug-exit, so QEMU
// exits with status (1<<1)|1 = 3.
var probeSector = func() []byte {
	code, err := hex.DecodeString("fa31c08ed88ec08ed0bc007cbf00106631c0b9000c66f3ab66c70600100320000066c706002003300000bf003066b883000000b9200066890566050000200083c708e2f2660f0116b87c0f20e06683c8200f22e066b8001000000f22d866b9800000c00f32660d000100000f300f20c0660d010000800f22c066ea817c0000080048c7c70000000148c7c1000040004831c0f348ab48c7c100c2eb0b48ffc975fbb001e6f4f4ebfd0000000000000000ffff0000009aaf000f00a87c0000")
	if err != nil || len(code) > 510 {
		panic("qemu: bad probe sector")
	}
	b := make([]byte, 512)
	copy(b, code)
	b[510], b[511] = 0x55, 0xaa
	return b
}()

// probeDiskSize pads the probe's disk: SeaBIOS cannot read the boot sector
// of a one-sector disk on q35's AHCI controller.
const probeDiskSize = 1 << 20

// ProbeAccel reports AccelKVM if /dev/kvm runs the probe guest (see
// probe.S) with binary under the machine and CPU options real VMs get, and
// AccelTCG otherwise (no /dev/kvm, an error, or a hang past the bound).
// Opening /dev/kvm, or running a real-mode boot sector, proves little: on
// some hosts both work while real guests abort or stall.
func ProbeAccel(ctx context.Context, binary string) string {
	if accelWorks(ctx, binary, AccelKVM) {
		return AccelKVM
	}
	return AccelTCG
}

func accelWorks(ctx context.Context, binary, accel string) bool {
	if accel == AccelKVM {
		f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
		if err != nil {
			return false
		}
		f.Close()
	}
	dir, err := os.MkdirTemp("", "writ-accel-probe")
	if err != nil {
		return false
	}
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "boot.img")
	disk := make([]byte, probeDiskSize)
	copy(disk, probeSector)
	if err := os.WriteFile(img, disk, 0o644); err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	args := append(machineArgs(accel), "-m", "256", "-nodefaults", "-no-user-config", "-display", "none",
		"-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-drive", "file="+qemuEscape(img)+",format=raw,if=ide")
	cmd := exec.CommandContext(ctx, binary, args...)
	err = cmd.Run()
	var ee *exec.ExitError
	return errors.As(err, &ee) && ee.ExitCode() == 3
}

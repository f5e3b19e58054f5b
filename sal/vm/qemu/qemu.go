// Package qemu is the QEMU backend of sal/vm: one qemu-system-x86_64
// process per VM (daemonized, in its own session), a QMP socket for control
// (github.com/digitalocean/go-qemu/qmp), virtio disks and NICs, the serial
// console appended to a file, and direct kernel or firmware boot.
//
// Acceleration is KVM or TCG; "auto" probes whether KVM really runs a guest
// (a bounded boot of a 512-byte boot sector) and falls back to TCG.
package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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
}

// Backend launches VMs with QEMU.
type Backend struct {
	cfg Config

	once  sync.Once
	accel string // resolved by once
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
	return &Backend{cfg: cfg}, nil
}

// Name implements vm.Backend.
func (b *Backend) Name() string { return "qemu" }

// Accel returns the acceleration in use, probing once for "auto".
func (b *Backend) Accel(ctx context.Context) string {
	b.once.Do(func() {
		b.accel = b.cfg.Accel
		if b.accel == AccelAuto {
			b.accel = ProbeAccel(ctx, b.cfg.Binary)
		}
	})
	return b.accel
}

// Args returns the QEMU command line for l (without the binary), the same
// one a person would type to run the guest by hand.
func (b *Backend) Args(l vm.Launch, accel string) []string {
	s := l.Spec
	cpu := "max"
	if accel == AccelKVM {
		cpu = "host"
	}
	args := []string{
		"-name", "writ-" + s.Name,
		"-machine", "q35,accel=" + accel,
		"-cpu", cpu,
		"-smp", strconv.Itoa(s.CPUs),
		"-m", strconv.Itoa(s.MemoryMiB),
		"-nodefaults", "-no-user-config", "-display", "none",
		"-chardev", "file,id=console,path=" + l.Console + ",append=on",
		"-serial", "chardev:console",
		"-qmp", "unix:" + filepath.Join(l.Dir, "qmp.sock") + ",server=on,wait=off",
		"-pidfile", filepath.Join(l.Dir, "qemu.pid"),
		"-daemonize",
	}
	if s.Kernel != "" {
		args = append(args, "-kernel", s.Kernel)
		if s.Initrd != "" {
			args = append(args, "-initrd", s.Initrd)
		}
		if s.Cmdline != "" {
			args = append(args, "-append", s.Cmdline)
		}
	} else {
		args = append(args, "-bios", s.Firmware)
	}
	for _, d := range s.Disks {
		opt := "file=" + qemuEscape(d.Path) + ",if=virtio,format=raw"
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
func (b *Backend) Launch(ctx context.Context, l vm.Launch) (int, error) {
	pidfile := filepath.Join(l.Dir, "qemu.pid")
	os.Remove(pidfile)
	os.Remove(filepath.Join(l.Dir, "qmp.sock"))
	// QEMU is a system tool with no library form: one process per VM.
	cmd := exec.Command(b.cfg.Binary, b.Args(l, b.Accel(ctx))...)
	cmd.Dir = l.Dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("qemu: %v: %s", err, strings.TrimSpace(string(out)))
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

// probeTimeout bounds the KVM probe: a working KVM runs the boot sector
// in well under a second; a broken one hangs.
const probeTimeout = 5 * time.Second

// bootSector writes 1 to isa-debug-exit (port 0xf4) and halts: QEMU exits
// with status (1<<1)|1 = 3 once the guest's first instruction runs.
var bootSector = func() []byte {
	b := make([]byte, 512)
	copy(b, []byte{0xb0, 0x01, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd}) // mov al,1; out 0xf4,al; hlt; jmp $-1
	b[510], b[511] = 0x55, 0xaa
	return b
}()

// ProbeAccel reports AccelKVM if /dev/kvm runs a guest with binary, and
// AccelTCG otherwise (no /dev/kvm, an error, or a hang past the bound).
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
	if err := os.WriteFile(img, bootSector, 0o644); err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, "-machine", "pc,accel="+accel, "-nodefaults", "-no-user-config", "-display", "none",
		"-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-drive", "file="+qemuEscape(img)+",format=raw,if=ide")
	err = cmd.Run()
	var ee *exec.ExitError
	return errors.As(err, &ee) && ee.ExitCode() == 3
}

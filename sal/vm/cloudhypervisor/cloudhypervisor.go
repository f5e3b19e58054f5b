package cloudhypervisor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/writ-fleet/writ/sal/vm"
)

// DefaultBinary is the cloud-hypervisor binary used by default.
const DefaultBinary = "cloud-hypervisor"

// apiTimeout bounds one API call; socketTimeout bounds the wait for a new
// process's API socket.
const (
	apiTimeout    = 30 * time.Second
	socketTimeout = 10 * time.Second
)

// Config sets up the backend.
type Config struct {
	// Binary defaults to DefaultBinary (looked up on PATH).
	Binary string
}

// Backend launches VMs with cloud-hypervisor.
type Backend struct {
	cfg Config
}

var _ vm.Backend = (*Backend)(nil)

// New returns the backend, or an error naming what is missing.
func New(cfg Config) (*Backend, error) {
	if cfg.Binary == "" {
		cfg.Binary = DefaultBinary
	}
	bin, err := exec.LookPath(cfg.Binary)
	if err != nil {
		return nil, fmt.Errorf("cloud-hypervisor: %s not found: %w", cfg.Binary, err)
	}
	cfg.Binary = bin
	return &Backend{cfg: cfg}, nil
}

// Name implements vm.Backend.
func (b *Backend) Name() string { return "cloud-hypervisor" }

// Socket returns the API socket of the VM in dir.
func Socket(dir string) string { return filepath.Join(dir, "api.sock") }

// NewAPI returns a client of the API served on socket.
func NewAPI(socket string) (*ClientWithResponses, error) {
	hc := &http.Client{
		Timeout: apiTimeout,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}},
	}
	return NewClientWithResponses("http://localhost/api/v1", WithHTTPClient(hc))
}

// BuildConfig returns the cold configuration of l's VM: every device is
// given at creation (no hot-plug).
func BuildConfig(l vm.Launch) VmConfig {
	s := l.Spec
	cfg := VmConfig{
		Cpus:    &CpusConfig{BootVcpus: s.CPUs, MaxVcpus: s.CPUs},
		Memory:  &MemoryConfig{Size: int64(s.MemoryMiB) << 20},
		Serial:  &SerialConfig{Mode: ConsoleModeFile, File: ptr(l.Console)},
		Console: &ConsoleConfig{Mode: ConsoleModeOff},
	}
	if !s.Kernel.IsZero() {
		cfg.Payload = PayloadConfig{Kernel: ptr(s.Kernel.Path())}
		if !s.Initrd.IsZero() {
			cfg.Payload.Initramfs = ptr(s.Initrd.Path())
		}
		if s.Cmdline != "" {
			cfg.Payload.Cmdline = ptr(s.Cmdline)
		}
	} else {
		cfg.Payload = PayloadConfig{Firmware: ptr(s.Firmware.Path())}
	}
	disks := []DiskConfig{}
	for _, d := range s.Disks {
		disks = append(disks, DiskConfig{Path: ptr(d.Path.Path()), Readonly: ptr(d.ReadOnly)})
	}
	disks = append(disks, DiskConfig{Path: ptr(l.Seed), Readonly: ptr(true)})
	cfg.Disks = &disks
	if len(s.NICs) > 0 {
		nets := []NetConfig{}
		for _, n := range s.NICs {
			nets = append(nets, NetConfig{Tap: ptr(n.Tap), Mac: ptr(n.MAC)})
		}
		cfg.Net = &nets
	}
	return cfg
}

func ptr[T any](v T) *T { return &v }

// Launch implements vm.Backend: start the process, create the VM, boot it.
// If any step fails the process is killed, so a failed launch leaves no
// VMM behind.
func (b *Backend) Launch(ctx context.Context, l vm.Launch) (int, error) {
	sock := Socket(l.Dir)
	os.Remove(sock)
	logf, err := os.OpenFile(filepath.Join(l.Dir, "vmm.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return 0, fmt.Errorf("cloud-hypervisor: %w", err)
	}
	defer logf.Close()
	// cloud-hypervisor is a program with no library form: one process per VM,
	// in its own session so that it outlives the runner.
	cmd := exec.Command(b.cfg.Binary, "--api-socket", "path="+sock)
	cmd.Dir = l.Dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("cloud-hypervisor: start: %w", err)
	}
	pid := cmd.Process.Pid
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }() // reap it when it ends
	fail := func(err error) (int, error) {
		cmd.Process.Kill()
		<-exited
		return 0, fmt.Errorf("cloud-hypervisor: %w%s", err, logTail(filepath.Join(l.Dir, "vmm.log")))
	}
	api, err := NewAPI(sock)
	if err != nil {
		return fail(err)
	}
	deadline := time.Now().Add(socketTimeout)
	for {
		rep, err := api.GetVmmPingWithResponse(ctx)
		if err == nil && rep.StatusCode() == http.StatusOK {
			break
		}
		select {
		case <-exited:
			return fail(errors.New("the process exited before serving its API"))
		default:
		}
		if time.Now().After(deadline) {
			return fail(fmt.Errorf("no API on %s after %s", sock, socketTimeout))
		}
		time.Sleep(20 * time.Millisecond)
	}
	created, err := api.CreateVMWithResponse(ctx, BuildConfig(l))
	if err != nil {
		return fail(fmt.Errorf("vm.create: %w", err))
	}
	if created.StatusCode() != http.StatusNoContent {
		return fail(fmt.Errorf("vm.create: %s: %s", created.Status(), strings.TrimSpace(string(created.Body))))
	}
	booted, err := api.BootVMWithResponse(ctx)
	if err != nil {
		return fail(fmt.Errorf("vm.boot: %w", err))
	}
	if booted.StatusCode() != http.StatusNoContent {
		return fail(fmt.Errorf("vm.boot: %s: %s", booted.Status(), strings.TrimSpace(string(booted.Body))))
	}
	return pid, nil
}

// Shutdown implements vm.Backend: vm.power-button.
func (b *Backend) Shutdown(ctx context.Context, dir string) error {
	api, err := NewAPI(Socket(dir))
	if err != nil {
		return err
	}
	rep, err := api.PowerButtonVMWithResponse(ctx)
	if err != nil {
		return fmt.Errorf("cloud-hypervisor: vm.power-button: %w", err)
	}
	if rep.StatusCode() != http.StatusNoContent {
		return fmt.Errorf("cloud-hypervisor: vm.power-button: %s: %s", rep.Status(), strings.TrimSpace(string(rep.Body)))
	}
	return nil
}

// logTail returns the end of the VMM's log, for error messages.
func logTail(path string) string {
	data, err := os.ReadFile(path)
	if err != nil || len(data) == 0 {
		return ""
	}
	if len(data) > 1024 {
		data = data[len(data)-1024:]
	}
	return "\nvmm log: " + strings.TrimSpace(string(data))
}

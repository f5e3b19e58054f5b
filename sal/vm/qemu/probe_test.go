package qemu

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/writ-fleet/writ/internal/guest"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/sal/vm"
)

// TestProbeAccel boots the probe's boot sector under TCG (it must pass:
// that proves the probe can say yes) and reports what auto picks here.
func TestProbeAccel(t *testing.T) {
	bin := testenv.RequireBinary(t, DefaultBinary)
	if !accelWorks(context.Background(), bin, AccelTCG) {
		t.Fatal("the probe's boot sector does not run under TCG: the probe could never say yes")
	}
	t.Logf("auto acceleration on this machine: %s", ProbeAccel(context.Background(), bin))
}

// TestProbeSector_Assembles holds probeSector to probe.S: the bytes are
// what GNU as and ld make of the source.
func TestProbeSector_Assembles(t *testing.T) {
	testenv.RequireBinary(t, "as")
	testenv.RequireBinary(t, "ld")
	dir := t.TempDir()
	obj, bin := filepath.Join(dir, "probe.o"), filepath.Join(dir, "probe.bin")
	for _, args := range [][]string{
		{"as", "--32", "-o", obj, "probe.S"},
		{"ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-o", bin, obj},
	} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	code, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(code, probeSector[:len(code)]) || bytes.ContainsFunc(probeSector[len(code):510], func(r rune) bool { return r != 0 }) {
		t.Errorf("probeSector differs from probe.S assembled:\n got %x\nwant %x", probeSector[:len(code)], code)
	}
}

// fakeKVMQEMU is a qemu-system-x86_64 in front of the real one whose KVM
// passes the probe but aborts every real launch, as seen on a host whose
// /dev/kvm runs a boot sector and then fails real guests.
const fakeKVMQEMU = `#!/bin/sh
case "$*" in
*isa-debug-exit*accel=kvm*|*accel=kvm*isa-debug-exit*) exit 3 ;;
*accel=kvm*) echo "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3234: kvm_buf_set_msrs: Assertion 'ret == cpu->kvm_msr_buf->nmsrs' failed." >&2; exit 134 ;;
esac
exec REAL "$@"
`

// TestBackend_KVMFallback: under auto, a KVM launch that dies after a good
// probe falls back to TCG with a log line, and the guest runs and serves.
func TestBackend_KVMFallback(t *testing.T) {
	real := testenv.RequireBinary(t, DefaultBinary)
	testenv.RequireRoot(t)
	fake := filepath.Join(t.TempDir(), "qemu-system-x86_64")
	if err := os.WriteFile(fake, []byte(strings.Replace(fakeKVMQEMU, "REAL", real, 1)), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/dev/kvm"); err != nil {
		// The probe opens /dev/kvm before it runs QEMU.
		t.Skip("no /dev/kvm: the probe would not reach QEMU")
	}
	var logs bytes.Buffer
	var mu sync.Mutex
	b, err := New(Config{Binary: fake, Accel: AccelAuto, Log: slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &mu}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if got := b.Accel(context.Background()); got != AccelKVM {
		t.Fatalf("Accel before any launch = %s, want kvm (the fake passes the probe)", got)
	}
	r := newRigWith(t, b)
	spec := r.spec("fb", guest.Cmdline)
	if _, err := r.m.Create(r.ctx, spec); err != nil {
		t.Fatal(err)
	}
	if _, err := r.m.Start(r.ctx, "fb"); err != nil {
		t.Fatalf("Start = %v, want the TCG fallback to launch it", err)
	}
	if got := b.Accel(context.Background()); got != AccelTCG {
		t.Errorf("Accel after the failed KVM launch = %s, want tcg", got)
	}
	mu.Lock()
	logged := logs.String()
	mu.Unlock()
	if !strings.Contains(logged, "falling back to TCG") || !strings.Contains(logged, "kvm_buf_set_msrs") {
		t.Errorf("log lacks the fallback line with KVM's error:\n%s", logged)
	}
	r.serving(spec.NICs[0].Address.Addr().String(), 2*time.Minute)
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", mustInfo(t, r, "fb").Pid))
	if !bytes.Contains(cmdline, []byte("accel=tcg")) {
		t.Errorf("the running guest's QEMU is not under TCG: %q", cmdline)
	}
}

func mustInfo(t *testing.T, r *rig, name string) vm.Info {
	t.Helper()
	i, err := r.m.Info(r.ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	return i
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

package efi_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/efi"
	"github.com/writ-fleet/writ/internal/guest"
	"github.com/writ-fleet/writ/internal/testenv"
)

func TestUSBImage_Golden(t *testing.T) {
	dir := t.TempDir()
	loader := filepath.Join(dir, "loader.efi")
	if err := os.WriteFile(loader, bytes.Repeat([]byte("writ"), 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "usb.img")
	if err := efi.WriteUSBImage(img, loader); err != nil {
		t.Fatal(err)
	}
	lines, err := efi.ListUSBImage(img)
	if err != nil {
		t.Fatal(err)
	}
	testenv.Golden(t, "usb.golden", strings.Join(lines, "\n")+"\n")
}

// kernelTree is the test guest's kernel package, unpacked (apt, cached).
func kernelTree(t *testing.T) efi.Kernel {
	t.Helper()
	testenv.RequireRoot(t)
	k, err := efi.FetchKernel(context.Background(), guest.KernelPackage, guest.DefaultCacheDir())
	if err != nil {
		t.Fatalf("fetch the kernel: %v", err)
	}
	return k
}

var sizeRe = regexp.MustCompile(`^(\S+ (?:init|lib/modules/\S+)) \d+$`)

func TestInitramfs_Golden(t *testing.T) {
	k := kernelTree(t)
	dir := t.TempDir()
	init := filepath.Join(dir, "writ")
	os.WriteFile(init, []byte("#!/bin/true\n"), 0o755)
	in := efi.Initramfs{Init: init, Modules: k.Modules, Config: efi.NodeConfig{Ledger: "http://10.0.2.2:7701", Site: "lab", Redis: "redis://10.0.2.2:6379/0"}}
	var a, b bytes.Buffer
	if err := in.Write(&a); err != nil {
		t.Fatal(err)
	}
	in.Write(&b)
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Error("two builds of the same initramfs differ")
	}
	zr, err := gzip.NewReader(&a)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(zr)
	lines, err := efi.List(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	// Module and init sizes follow the kernel and the build; the golden
	// file holds names, modes and the rest's sizes.
	for i, l := range lines {
		if m := sizeRe.FindStringSubmatch(l); m != nil {
			lines[i] = m[1]
		}
	}
	testenv.Golden(t, "initramfs.golden", strings.Join(lines, "\n")+"\n")
	for _, want := range []string{"lib/modules/btrfs.ko", "lib/modules/virtio_net.ko", "lib/modules/nf_tables.ko", "lib/modules/bridge.ko"} {
		if !strings.Contains(strings.Join(lines, "\n"), want) {
			t.Errorf("initramfs lacks %s", want)
		}
	}
}

// TestUKI_BootsFromUSB puts a unified kernel image (the test guest's
// kernel and initramfs) on a USB image and boots it in QEMU with OVMF
// under TCG, from the USB stick.
func TestUKI_BootsFromUSB(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM under TCG: skipped under -short (make test runs it)")
	}
	art := testenv.Guest(t)
	if _, err := os.Stat(efi.DefaultStub); err != nil {
		t.Fatalf("%s missing: make test installs systemd-boot-efi", efi.DefaultStub)
	}
	code, vars := OVMF(t)
	dir := t.TempDir()
	uki := filepath.Join(dir, "guest.efi")
	if err := (efi.UKI{Kernel: art.Kernel, Initrd: art.Initrd, Cmdline: guest.Cmdline + " writ.die", OSRelease: "NAME=test\n"}).Build(context.Background(), uki); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "usb.img")
	if err := efi.WriteUSBImage(img, uki); err != nil {
		t.Fatal(err)
	}
	console := filepath.Join(dir, "console.log")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "512", "-nodefaults", "-display", "none",
		"-serial", "file:"+console, "-no-reboot",
		"-drive", "if=pflash,format=raw,readonly=on,file="+code, "-drive", "if=pflash,format=raw,file="+vars,
		"-device", "qemu-xhci", "-drive", "if=none,id=stick,format=raw,file="+img, "-device", "usb-storage,drive=stick,bootindex=0")
	start := time.Now()
	// The guest powers off once it has booted (writ.die), which ends QEMU.
	if out, err := cmd.CombinedOutput(); err != nil {
		log, _ := os.ReadFile(console)
		t.Fatalf("qemu: %v\n%s\nconsole:\n%s", err, out, log)
	}
	log, _ := os.ReadFile(console)
	if !strings.Contains(string(log), "writ-guest: booted") {
		t.Fatalf("the efi.UKI did not boot from the USB image; console:\n%s", log)
	}
	t.Logf("power-on to the guest's init and back off: %s", time.Since(start).Round(time.Millisecond))
}

// OVMF returns the firmware code and a private copy of its variable store.
func OVMF(t *testing.T) (code, vars string) {
	t.Helper()
	code, varsTemplate := "/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"
	data, err := os.ReadFile(varsTemplate)
	if err != nil {
		t.Fatalf("OVMF: %v (make test installs ovmf)", err)
	}
	vars = filepath.Join(t.TempDir(), "OVMF_VARS.fd")
	if err := os.WriteFile(vars, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return code, vars
}

// TestFetchKernel_Concurrent: four callers at once into one empty cache,
// two fetching the kernel and two building the test guest on it, all
// succeed with one download. (Two tests once fetched into the same empty
// cache at once and one deleted the other's half-unpacked tree.)
func TestFetchKernel_Concurrent(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, "busybox")
	aptGet, err := exec.LookPath("apt-get")
	if err != nil {
		t.Skip("apt-get is not installed")
	}
	// An apt-get in front of the real one counts the downloads.
	bin, count := t.TempDir(), filepath.Join(t.TempDir(), "downloads")
	wrapper := "#!/bin/sh\n[ \"$1\" = download ] && echo \"$2\" >> " + count + "\nexec " + aptGet + " \"$@\"\n"
	if err := os.WriteFile(filepath.Join(bin, "apt-get"), []byte(wrapper), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))

	cache := t.TempDir()
	errs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		go func() {
			if i%2 == 0 {
				_, err := efi.FetchKernel(context.Background(), guest.KernelPackage, cache)
				errs <- err
				return
			}
			_, err := guest.Build(context.Background(), cache)
			errs <- err
		}()
	}
	for i := 0; i < 4; i++ {
		if err := <-errs; err != nil {
			t.Errorf("caller: %v", err)
		}
	}
	data, _ := os.ReadFile(count)
	if n := strings.Count(string(data), "\n"); n != 1 {
		t.Errorf("apt-get download ran %d times, want once:\n%s", n, data)
	}
	if left, _ := filepath.Glob(filepath.Join(cache, ".linux-image-*")); len(left) > 0 {
		t.Errorf("temporary directories left in the cache: %v", left)
	}
}

func TestTools(t *testing.T) {
	files, missing, err := efi.Tools([]string{"ls", "writ-no-such-tool"})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := files["sbin/ls"]; !ok || len(files) < 2 {
		t.Errorf("Tools files = %v, want sbin/ls and its libraries", files)
	}
	if len(missing) != 1 || missing[0] != "writ-no-such-tool" {
		t.Errorf("Tools missing = %v, want the unknown tool", missing)
	}
}

// TestNodeConfig_Public: the netboot configuration keeps the site, the
// ledger and the Redis user, and drops the token and the password.
func TestNodeConfig_Public(t *testing.T) {
	c := efi.NodeConfig{Ledger: "https://10.0.0.1:7701", Site: "lab", Token: "writ-enroll-secret", Redis: "rediss://runner:hunter2@10.0.1.1:6379/0", CA: "pem"}
	p := c.Public()
	if p.Token != "" || strings.Contains(p.Redis, "hunter2") || p.Redis != "rediss://runner@10.0.1.1:6379/0" || p.Site != "lab" || p.CA != "pem" {
		t.Errorf("Public() = %+v", p)
	}
	if c.Token == "" {
		t.Error("Public changed the original")
	}
	if r := efi.RedactURL(c.Redis); strings.Contains(r, "hunter2") {
		t.Errorf("RedactURL = %s", r)
	}
}

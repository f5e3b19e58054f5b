// Package guest builds the tiny demo and test VM guest: Debian's cloud
// kernel (fetched with apt, never committed) and a busybox initramfs whose
// init loads the virtio drivers, configures eth0 from the NoCloud seed's
// network-config, and serves the first bytes of its data disk over HTTP on
// port 80. It boots under TCG in a few seconds.
//
// Artifacts are built once into a cache directory and reused; a flock
// keeps parallel builders from racing.
package guest

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/u-root/u-root/pkg/cpio"
	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/efi"
)

// KernelPackage is the Debian meta-package whose kernel the guest boots.
const KernelPackage = "linux-image-cloud-amd64"

// Modules are the kernel modules the guest loads (their dependencies are
// added): virtio PCI transport, disk and NIC, and ISO 9660 for the seed.
var Modules = []string{"virtio_pci", "virtio_blk", "virtio_net", "isofs"}

// Cmdline is the kernel command line the guest expects. Add "writ.die" to
// make it power off as soon as it boots (a guest that keeps dying).
const Cmdline = "console=ttyS0 panic=-1 quiet"

// Artifacts are the built guest's files.
type Artifacts struct {
	Kernel string // vmlinuz
	Initrd string // initramfs (newc cpio, gzip)
}

// DefaultCacheDir is where Build keeps its artifacts by default.
func DefaultCacheDir() string {
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "writ", "guest")
	}
	return filepath.Join(os.TempDir(), "writ-guest")
}

// Build returns the guest's kernel and initramfs, building them into dir
// the first time (downloading the kernel package with apt-get). It needs
// apt-get, dpkg-deb and a static busybox (Debian's busybox-static).
func Build(ctx context.Context, dir string) (Artifacts, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Artifacts{}, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return Artifacts{}, err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return Artifacts{}, err
	}
	out := Artifacts{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img")}
	if exists(out.Kernel) && exists(out.Initrd) {
		return out, nil
	}
	k, err := efi.FetchKernel(ctx, KernelPackage, dir)
	if err != nil {
		return Artifacts{}, err
	}
	initrd, err := buildInitramfs(k.Modules)
	if err != nil {
		return Artifacts{}, err
	}
	if err := os.WriteFile(out.Initrd+".tmp", initrd, 0o644); err != nil {
		return Artifacts{}, err
	}
	kernel, err := os.ReadFile(k.Vmlinuz)
	if err == nil {
		err = os.WriteFile(out.Kernel+".tmp", kernel, 0o644)
	}
	if err == nil {
		err = os.Rename(out.Initrd+".tmp", out.Initrd)
	}
	if err == nil {
		err = os.Rename(out.Kernel+".tmp", out.Kernel)
	}
	return out, err
}

// initScript is the guest's /init.
const initScript = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m; done
echo "writ-guest: booted"
if grep -q writ.die /proc/cmdline; then
	echo "writ-guest: told to die"
	poweroff -f
fi
mkdir -p /seed /www
for i in 1 2 3 4 5 6 7 8 9 10; do
	for d in /dev/vd?; do
		mount -t iso9660 -o ro $d /seed 2>/dev/null || continue
		[ -f /seed/network-config ] && break 2
		umount /seed
	done
	sleep 0.2
done
addr=$(sed -n 's/^ *- "\([0-9.]*\/[0-9]*\)"$/\1/p' /seed/network-config | head -n 1)
gw=$(sed -n 's/^ *via: "\([0-9.]*\)"$/\1/p' /seed/network-config | head -n 1)
ip link set lo up
ip link set eth0 up
ip addr add $addr dev eth0
ip route add default via $gw
echo "writ-guest: network eth0 $addr via $gw"
dd if=/dev/vda bs=4096 count=1 2>/dev/null | tr -d '\000' > /www/index.html
httpd -p 80 -h /www
echo "writ-guest: serving http on port 80"
while true; do sleep 3600; done
`

// buildInitramfs makes the initramfs: busybox, the modules, and /init.
func buildInitramfs(modDir string) ([]byte, error) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		return nil, errors.New("guest: busybox not found (apt-get install busybox-static)")
	}
	if out, _ := exec.Command("file", "-L", bb).Output(); bytes.Contains(out, []byte("dynamically linked")) {
		return nil, fmt.Errorf("guest: %s is dynamically linked; install busybox-static", bb)
	}
	busybox, err := os.ReadFile(bb)
	if err != nil {
		return nil, err
	}
	mods, err := efi.ResolveModules(modDir, Modules)
	if err != nil {
		return nil, err
	}
	var order []string
	records := []cpio.Record{
		cpio.Directory("bin", 0o755), cpio.Directory("dev", 0o755), cpio.Directory("etc", 0o755),
		cpio.Directory("proc", 0o755), cpio.Directory("sys", 0o755), cpio.Directory("tmp", 0o1777),
		cpio.StaticFile("bin/busybox", string(busybox), 0o755),
		cpio.Symlink("bin/sh", "busybox"),
		cpio.StaticFile("init", initScript, 0o755),
		cpio.CharDev("dev/console", 0o600, 5, 1),
	}
	for _, m := range mods {
		data, err := os.ReadFile(filepath.Join(modDir, m))
		if err != nil {
			return nil, err
		}
		name := filepath.Base(m)
		records = append(records, cpio.StaticFile("lib/modules/"+name, string(data), 0o644))
		order = append(order, name)
	}
	records = append(records, cpio.StaticFile("etc/modules.order", strings.Join(order, "\n")+"\n", 0o644))
	cpio.MakeAllReproducible(records)
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	w := cpio.Newc.Writer(gz)
	if err := cpio.WriteRecordsAndDirs(w, records); err != nil {
		return nil, fmt.Errorf("guest: initramfs: %w", err)
	}
	if err := cpio.WriteTrailer(w); err != nil {
		return nil, err
	}
	if err := gz.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteDisk writes a raw disk image of size bytes whose first block holds
// page, the text the guest serves.
func WriteDisk(path, page string, size int64) error {
	if len(page) > 4096 {
		return errors.New("guest: page longer than 4096 bytes")
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(page); err == nil {
		err = f.Truncate(size)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

package efi

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultCacheDir is where fetched kernel packages are kept by default:
// $XDG_CACHE_HOME/writ/kernel (~/.cache/writ/kernel).
func DefaultCacheDir() string {
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "writ", "kernel")
	}
	return filepath.Join(os.TempDir(), "writ-kernel")
}

// Kernel is an unpacked Debian kernel package.
type Kernel struct {
	Vmlinuz string // the kernel image
	Modules string // its lib/modules/VERSION directory
	Version string
}

// FetchKernel returns the kernel of Debian package pkg (a meta-package
// such as linux-image-amd64 is resolved to the versioned one), downloaded
// with apt-get into dir and unpacked there once.
func FetchKernel(ctx context.Context, pkg, dir string) (Kernel, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Kernel{}, err
	}
	real, err := kernelPackage(ctx, pkg)
	if err != nil {
		return Kernel{}, err
	}
	root := filepath.Join(dir, real)
	if err := fetchKernel(ctx, real, dir, root); err != nil {
		return Kernel{}, err
	}
	vmlinuz, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	mods, _ := filepath.Glob(filepath.Join(root, "lib", "modules", "*"))
	if len(vmlinuz) != 1 || len(mods) != 1 {
		return Kernel{}, fmt.Errorf("efi: unexpected kernel package layout in %s", root)
	}
	return Kernel{Vmlinuz: vmlinuz[0], Modules: mods[0], Version: filepath.Base(mods[0])}, nil
}

// fetchKernel downloads the kernel package into dir and unpacks it into
// root. apt-get and dpkg-deb do this: no Go library speaks apt's
// repositories and keys.
//
// Callers in other goroutines and processes (tests in parallel, two `writ
// image build`s) share the cache: an exclusive flock per package serialises
// them, so the package is downloaded once and nobody removes a tree another
// is unpacking. The download and the unpacking each go to a directory of
// their own and are renamed into place, so a crash leaves no half-written
// .deb or tree behind under the final names.
func fetchKernel(ctx context.Context, pkg, dir, root string) error {
	unlock, err := lockFile(filepath.Join(dir, ".lock-"+pkg))
	if err != nil {
		return err
	}
	defer unlock()
	if _, err := os.Stat(root); err == nil {
		return nil // an earlier caller unpacked it while we waited
	}
	// Leftovers of a caller that crashed while holding the lock.
	left, _ := filepath.Glob(filepath.Join(dir, "."+pkg+".*"))
	for _, l := range left {
		os.RemoveAll(l)
	}
	debs, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
	if len(debs) == 0 {
		deb, err := downloadPackage(ctx, pkg, dir)
		if err != nil {
			return err
		}
		debs = []string{deb}
	}
	tmp, err := os.MkdirTemp(dir, "."+pkg+".unpack-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0], tmp).CombinedOutput(); err != nil {
		return fmt.Errorf("efi: unpack %s: %v\n%s", debs[0], err, out)
	}
	return os.Rename(tmp, root)
}

// downloadPackage fetches pkg's .deb with apt-get into a directory of its
// own under dir and moves it into dir, returning its path.
func downloadPackage(ctx context.Context, pkg, dir string) (string, error) {
	tmp, err := os.MkdirTemp(dir, "."+pkg+".download-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	download := func() ([]byte, error) {
		cmd := exec.CommandContext(ctx, "apt-get", "download", pkg)
		cmd.Dir = tmp
		return cmd.CombinedOutput()
	}
	out, err := download()
	if err != nil && os.Geteuid() == 0 {
		// A fresh machine may have no package lists yet.
		if upd, uerr := exec.CommandContext(ctx, "apt-get", "update", "-qq").CombinedOutput(); uerr != nil {
			return "", fmt.Errorf("efi: apt-get update: %v\n%s", uerr, upd)
		}
		out, err = download()
	}
	if err != nil {
		return "", fmt.Errorf("efi: apt-get download %s: %v\n%s", pkg, err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, pkg+"_*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("efi: apt-get download %s left %d .deb files", pkg, len(debs))
	}
	deb := filepath.Join(dir, filepath.Base(debs[0]))
	if err := os.Rename(debs[0], deb); err != nil {
		return "", err
	}
	return deb, nil
}

// lockFile takes an exclusive flock on path (made if missing) and returns
// its release. The kernel drops the lock if the process dies.
func lockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("efi: lock %s: %w", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("efi: lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// kernelPackage resolves the meta-package to the versioned kernel package
// (running apt-get update first if the lists do not know it, as root).
func kernelPackage(ctx context.Context, meta string) (string, error) {
	if v, ok := strings.CutPrefix(meta, "linux-image-"); ok && v != "" && v[0] >= '0' && v[0] <= '9' {
		return meta, nil // already a versioned package
	}
	for try := 0; ; try++ {
		out, _ := exec.CommandContext(ctx, "apt-cache", "depends", meta).Output()
		for _, line := range strings.Split(string(out), "\n") {
			if dep, ok := strings.CutPrefix(strings.TrimSpace(line), "Depends: "); ok && strings.HasPrefix(dep, "linux-image-") {
				return dep, nil
			}
		}
		if try > 0 || os.Geteuid() != 0 {
			return "", fmt.Errorf("efi: apt-cache knows no kernel behind %s (run apt-get update as root)", meta)
		}
		if upd, err := exec.CommandContext(ctx, "apt-get", "update", "-qq").CombinedOutput(); err != nil {
			return "", fmt.Errorf("efi: apt-get update: %v\n%s", err, upd)
		}
	}
}

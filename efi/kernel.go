package efi

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

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
func fetchKernel(ctx context.Context, pkg, dir, root string) error {
	if _, err := os.Stat(root); err == nil {
		return nil
	}
	debs, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
	if len(debs) == 0 {
		download := func() ([]byte, error) {
			cmd := exec.CommandContext(ctx, "apt-get", "download", pkg)
			cmd.Dir = dir
			return cmd.CombinedOutput()
		}
		out, err := download()
		if err != nil && os.Geteuid() == 0 {
			// A fresh machine may have no package lists yet.
			if upd, uerr := exec.CommandContext(ctx, "apt-get", "update", "-qq").CombinedOutput(); uerr != nil {
				return fmt.Errorf("efi: apt-get update: %v\n%s", uerr, upd)
			}
			out, err = download()
		}
		if err != nil {
			return fmt.Errorf("efi: apt-get download %s: %v\n%s", pkg, err, out)
		}
		debs, _ = filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
		if len(debs) == 0 {
			return fmt.Errorf("efi: apt-get download %s left no .deb in %s", pkg, dir)
		}
	}
	tmp := root + ".tmp"
	os.RemoveAll(tmp)
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0], tmp).CombinedOutput(); err != nil {
		return fmt.Errorf("efi: unpack %s: %v\n%s", debs[0], err, out)
	}
	return os.Rename(tmp, root)
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

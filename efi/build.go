package efi

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
)

// Build describes a node image to make.
type Build struct {
	// Kernel is the kernel's vmlinuz and Modules its lib/modules/VERSION.
	Kernel, Modules string
	// Writ is the static writ binary (the node's /init).
	Writ string
	// Config is the site configuration baked in.
	Config NodeConfig
	// Cmdline is the kernel command line; DefaultCmdline when empty.
	Cmdline string
	// BaseURL is where writ image serve will serve the directory, for the
	// iPXE script (http://HOST:PORT).
	BaseURL string
	// Extra files for the initramfs (archive path → host path).
	Extra map[string]string
	// Stub is the EFI stub; DefaultStub when empty.
	Stub string
}

// Artifact is one file made, with its size.
type Artifact struct {
	Name string
	Path string
	Size int64
}

// Make writes the image's artifacts into dir: vmlinuz, initrd.img,
// writ-node.efi (UKI), usb.img and boot.ipxe.
func (b Build) Make(ctx context.Context, dir string) ([]Artifact, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	cmdline := b.Cmdline
	if cmdline == "" {
		cmdline = DefaultCmdline
	}
	kernel := filepath.Join(dir, KernelFile)
	data, err := os.ReadFile(b.Kernel)
	if err != nil {
		return nil, fmt.Errorf("efi: kernel: %w", err)
	}
	if err := os.WriteFile(kernel, data, 0o644); err != nil {
		return nil, err
	}
	// Two initramfs: the one writ image serve hands to whoever netboots
	// (initrd.img) holds no secret; the USB stick's own (inside the UKI)
	// holds the configuration whole, token included.
	initrd := filepath.Join(dir, InitrdFile)
	if err := b.writeInitramfs(initrd, b.Config.Public(), 0o644); err != nil {
		return nil, err
	}
	private := filepath.Join(dir, ".usb-initrd.img")
	defer os.Remove(private)
	if err := b.writeInitramfs(private, b.Config, 0o600); err != nil {
		return nil, err
	}
	uki := filepath.Join(dir, UKIFile)
	osrel := "NAME=\"writ node\"\nID=writ\nPRETTY_NAME=\"writ node image\"\n"
	if err := (UKI{Stub: b.Stub, Kernel: kernel, Initrd: private, Cmdline: cmdline, OSRelease: osrel}).Build(ctx, uki); err != nil {
		return nil, err
	}
	if err := WriteUSBImage(filepath.Join(dir, USBFile), uki); err != nil {
		return nil, err
	}
	// They hold the token: for the operator's eyes (and dd) only.
	for _, name := range []string{UKIFile, USBFile} {
		if err := os.Chmod(filepath.Join(dir, name), 0o600); err != nil {
			return nil, err
		}
	}
	base := b.BaseURL
	if base == "" {
		base = "http://${next-server}:7780"
	}
	if err := os.WriteFile(filepath.Join(dir, IPXEFile), []byte(IPXEScript(base, cmdline)), 0o644); err != nil {
		return nil, err
	}
	var out []Artifact
	for _, name := range []string{KernelFile, InitrdFile, UKIFile, USBFile, IPXEFile} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			return nil, err
		}
		out = append(out, Artifact{Name: name, Path: filepath.Join(dir, name), Size: st.Size()})
	}
	return out, nil
}

// writeInitramfs writes the initramfs with cfg to path.
func (b Build) writeInitramfs(path string, cfg NodeConfig, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	err = Initramfs{Init: b.Writ, Modules: b.Modules, Config: cfg, Extra: b.Extra}.Write(f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(path, mode)
	}
	return err
}

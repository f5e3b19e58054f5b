package efi

import (
	"context"
	"debug/pe"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// DefaultStub is Debian's systemd EFI stub (package systemd-boot-efi).
const DefaultStub = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"

// UKI describes a unified kernel image.
type UKI struct {
	Stub      string // the EFI stub; DefaultStub when empty
	Kernel    string
	Initrd    string
	Cmdline   string
	OSRelease string // contents of the .osrel section
}

// Build writes the unified kernel image to out: the stub with .osrel,
// .cmdline, .linux and .initrd sections placed after its own, each at the
// stub's section alignment. objcopy adds the sections: no Go library edits
// PE files.
func (u UKI) Build(ctx context.Context, out string) error {
	stub := u.Stub
	if stub == "" {
		stub = DefaultStub
	}
	f, err := pe.Open(stub)
	if err != nil {
		return fmt.Errorf("efi: stub %s: %w (apt-get install systemd-boot-efi)", stub, err)
	}
	opt, ok := f.OptionalHeader.(*pe.OptionalHeader64)
	if !ok {
		f.Close()
		return errors.New("efi: the stub is not a PE32+ image")
	}
	var end uint64
	for _, s := range f.Sections {
		end = max(end, uint64(s.VirtualAddress)+uint64(s.VirtualSize))
	}
	f.Close()
	align := uint64(opt.SectionAlignment)
	up := func(v uint64) uint64 { return (v + align - 1) / align * align }
	tmp, err := os.MkdirTemp(filepath.Dir(out), ".uki")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	osrel := filepath.Join(tmp, "osrel")
	cmdline := filepath.Join(tmp, "cmdline")
	if err := os.WriteFile(osrel, []byte(u.OSRelease), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(cmdline, []byte(u.Cmdline), 0o644); err != nil {
		return err
	}
	args := []string{}
	next := up(end)
	for _, s := range []struct{ name, path string }{{".osrel", osrel}, {".cmdline", cmdline}, {".linux", u.Kernel}, {".initrd", u.Initrd}} {
		st, err := os.Stat(s.path)
		if err != nil {
			return fmt.Errorf("efi: %s: %w", s.name, err)
		}
		args = append(args, "--add-section", s.name+"="+s.path, "--change-section-vma", fmt.Sprintf("%s=0x%x", s.name, opt.ImageBase+next))
		next = up(next + uint64(st.Size()))
	}
	args = append(args, stub, out)
	if o, err := exec.CommandContext(ctx, "objcopy", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("efi: objcopy: %v\n%s", err, o)
	}
	return nil
}

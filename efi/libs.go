package efi

import (
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// libDirs are where Debian keeps shared libraries.
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"}

// WithLibraries returns the files an initramfs needs to run the dynamic
// executable bin at archive path dst: the binary itself, its ELF
// interpreter and every shared library it needs, transitively (archive
// path → host path). It reads DT_NEEDED from the ELF files themselves.
func WithLibraries(dst, bin string) (map[string]string, error) {
	out := map[string]string{dst: bin}
	var visit func(path string) error
	seen := map[string]bool{}
	visit = func(path string) error {
		if seen[path] {
			return nil
		}
		seen[path] = true
		f, err := elf.Open(path)
		if err != nil {
			return fmt.Errorf("efi: %s: %w", path, err)
		}
		defer f.Close()
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				data := make([]byte, p.Filesz)
				if _, err := p.ReadAt(data, 0); err != nil {
					return err
				}
				interp := string(data[:len(data)-1])
				out[interp[1:]] = interp
			}
		}
		needed, err := f.ImportedLibraries()
		if err != nil {
			return err
		}
		for _, lib := range needed {
			found := ""
			for _, d := range libDirs {
				if p := filepath.Join(d, lib); fileExists(p) {
					found = p
					break
				}
			}
			if found == "" {
				return fmt.Errorf("efi: %s needs %s, which is not in %v", path, lib, libDirs)
			}
			resolved, err := filepath.EvalSymlinks(found)
			if err != nil {
				return err
			}
			out[found[1:]] = resolved
			if err := visit(resolved); err != nil {
				return err
			}
		}
		return nil
	}
	return out, visit(bin)
}

// IsStatic reports whether the ELF executable at path needs no
// interpreter (a static binary, as /init must be).
func IsStatic(path string) (bool, error) {
	f, err := elf.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false, nil
		}
	}
	return true, nil
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// NodeTools are the host programs the node image carries: the node formats
// its empty disk with mkfs.btrfs and sets quota limits with btrfs (no Go
// library makes btrfs or manages its quota groups).
var NodeTools = []string{"mkfs.btrfs", "btrfs"}

// Tools finds each named program on PATH and returns the initramfs files
// for them (sbin/NAME and the libraries it needs), and the names it did
// not find: an image without them still boots, but its nodes lack them.
func Tools(names []string) (files map[string]string, missing []string, err error) {
	files = map[string]string{}
	for _, name := range names {
		path, err := exec.LookPath(name)
		if err != nil {
			missing = append(missing, name)
			continue
		}
		fs, err := WithLibraries("sbin/"+name, path)
		if err != nil {
			return nil, nil, err
		}
		for k, v := range fs {
			files[k] = v
		}
	}
	return files, missing, nil
}

package efi

import (
	"bytes"
	"debug/elf"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// ResolveModules returns the module files (relative to modDir) to load for
// names, in their order, each after its dependencies. Dependencies are read from each module's
// .modinfo section: Debian's package ships no modules.dep.
func ResolveModules(modDir string, names []string) ([]string, error) {
	index := map[string]string{} // module name → relative path
	err := filepath.WalkDir(filepath.Join(modDir, "kernel"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".ko") {
			return err
		}
		rel, _ := filepath.Rel(modDir, p)
		name := strings.ReplaceAll(strings.TrimSuffix(d.Name(), ".ko"), "-", "_")
		index[name] = rel
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("efi: index modules: %w", err)
	}
	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string) error
	visit = func(name string) error {
		name = strings.ReplaceAll(name, "-", "_")
		switch state[name] {
		case 1:
			return fmt.Errorf("efi: module dependency cycle at %s", name)
		case 2:
			return nil
		}
		rel, ok := index[name]
		if !ok {
			return fmt.Errorf("efi: module %s not in %s (built in? then leave it out)", name, modDir)
		}
		state[name] = 1
		deps, err := moduleDepends(filepath.Join(modDir, rel))
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, rel)
		return nil
	}
	// In the caller's order: soft dependencies (a crc32c implementation
	// before libcrc32c) are not in .modinfo's depends, so callers list them
	// first.
	for _, n := range names {
		if err := visit(n); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// moduleDepends reads "depends=" from a module's .modinfo section.
func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("efi: module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, nil
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("efi: module %s: %w", path, err)
	}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			if len(v) == 0 {
				return nil, nil
			}
			return strings.Split(string(v), ","), nil
		}
	}
	return nil, nil
}

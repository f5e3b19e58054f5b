package storage

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/writ-fleet/writ/sal/internal/poolfile"
)

// File is a resolved regular file of the pool, the only form in which
// a path reaches the VM layer: outside sal/ nothing can make one but Holds.
type File = poolfile.File

// ErrNotInPool marks a path that is not a file of the pool's volumes or
// images.
var ErrNotInPool = fmt.Errorf("not a file of the storage pool")

// Holds returns path as a File, with symlinks resolved, if it is a regular file
// inside one of the pool's volumes (volumes/NAME/…, and volume is NAME) or
// cached images (images/SHA256/disk.img, and volume is ""), and
// ErrNotInPool otherwise. The VM layer takes
// disks, kernels and initrds only through it, so a script cannot hand the
// hypervisor (running as root) a host file or device such as /dev/sda.
func (p *Pool) Holds(path string) (file File, volume string, err error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return File{}, "", fmt.Errorf("%q: %w", path, ErrNotInPool)
	}
	rel, err := filepath.Rel(p.mnt, real)
	if err != nil || rel == "." || strings.HasPrefix(rel, "..") {
		return File{}, "", fmt.Errorf("%q is outside the pool: %w", path, ErrNotInPool)
	}
	parts := strings.Split(rel, string(filepath.Separator))
	switch {
	case len(parts) >= 3 && parts[0] == "volumes" && ValidName(parts[1]):
		volume = parts[1]
	case len(parts) == 3 && parts[0] == "images" && shaRe.MatchString(parts[1]) && parts[2] == ImageFile:
	default:
		return File{}, "", fmt.Errorf("%q is not in a volume or a cached image: %w", path, ErrNotInPool)
	}
	st, err := os.Stat(real)
	if err != nil || !st.Mode().IsRegular() {
		return File{}, "", fmt.Errorf("%q is not a regular file: %w", path, ErrNotInPool)
	}
	return poolfile.Make(real), volume, nil
}

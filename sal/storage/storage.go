// Package storage is the node's storage layer: one btrfs pool, on a block
// device or (for development) a loop-backed file, holding volumes (one
// subvolume each, its size enforced by a btrfs quota group) and their
// read-only snapshots.
//
// Every operation is idempotent ("ensure"): run twice, it converges. A pool
// is formatted only when its device or file holds no data, or when the
// operator says Force; anything else is refused.
//
// Layout inside the pool:
//
//	volumes/<name>             a volume (writable subvolume)
//	snapshots/<volume>/<name>  a snapshot (read-only subvolume)
//
// Subvolume ioctls go through github.com/containerd/btrfs. Formatting runs
// mkfs.btrfs, and quota groups run the btrfs tool (btrfs-progs): no Go
// library covers mkfs or qgroups.
package storage

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Errors callers can test for.
var (
	ErrHoldsData   = errors.New("holds data")
	ErrInvalidName = errors.New("invalid name")
	ErrNotFound    = errors.New("not found")
	ErrQuota       = errors.New("volume size limit reached")
)

// Config says where the pool lives. Exactly one of Device and File.
type Config struct {
	// Device is a block device for the pool.
	Device string
	// File is a pool file, attached through a loop device (development).
	File string
	// Size is the size of File when it has to be created. Required then.
	Size int64
	// Mountpoint is where the pool is mounted. Required.
	Mountpoint string
	// Force allows formatting a device or file that holds data.
	Force bool
	// ImageAllow is what image downloads may reach besides public
	// addresses (see ImagePolicy). Optional.
	ImageAllow ImagePolicy
	// MaxImageBytes bounds one image download. Default
	// DefaultMaxImageBytes.
	MaxImageBytes int64
}

// Pool is a mounted btrfs pool.
type Pool struct {
	cfg    Config
	mnt    string
	owned  bool         // mounted by Open (so Close unmounts)
	client *http.Client // image downloads, under the address policy
}

// btrfsMagic sits at 64 KiB + 0x40 in a btrfs superblock.
const (
	btrfsMagic       = "_BHRfS_M"
	btrfsMagicOffset = 0x10040
)

// Open mounts the pool, creating it when needed: a missing pool file is
// created with Size, an empty device or file is formatted, an existing
// btrfs is mounted, and anything else is refused unless Force. A pool that
// is already mounted at Mountpoint (a restarted runner) is used as it is.
// Quotas are enabled.
func Open(ctx context.Context, cfg Config) (*Pool, error) {
	if (cfg.Device == "") == (cfg.File == "") {
		return nil, errors.New("storage: name exactly one of a device and a pool file")
	}
	if cfg.Mountpoint == "" {
		return nil, errors.New("storage: Mountpoint is required")
	}
	mnt, err := filepath.Abs(cfg.Mountpoint)
	if err != nil {
		return nil, err
	}
	if cfg.MaxImageBytes == 0 {
		cfg.MaxImageBytes = DefaultMaxImageBytes
	}
	p := &Pool{cfg: cfg, mnt: mnt, client: imageClient(cfg.ImageAllow)}
	if mounted, err := isBtrfsMount(mnt); err != nil {
		return nil, err
	} else if mounted {
		return p, p.prepare(ctx)
	}
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return nil, fmt.Errorf("storage: mountpoint: %w", err)
	}
	dev := cfg.Device
	if cfg.File != "" {
		if err := ensureFile(cfg.File, cfg.Size); err != nil {
			return nil, err
		}
	}
	src := cfg.Device
	if src == "" {
		src = cfg.File
	}
	state, err := inspect(src)
	if err != nil {
		return nil, err
	}
	if state == holdsData && !cfg.Force {
		return nil, fmt.Errorf("storage: %s %w that is not a btrfs pool; refusing to format it (force to override)", src, ErrHoldsData)
	}
	var loop *os.File
	if cfg.File != "" {
		if dev, loop, err = attachLoop(cfg.File); err != nil {
			return nil, fmt.Errorf("storage: %w", err)
		}
		// The mount holds the loop device from here on; closing our handle
		// lets autoclear detach it when the pool is unmounted.
		defer loop.Close()
	}
	if state != isBtrfs {
		if err := mkfs(ctx, dev, cfg.Force); err != nil {
			return nil, err
		}
	}
	if err := unix.Mount(dev, mnt, "btrfs", 0, ""); err != nil {
		return nil, fmt.Errorf("storage: mount %s on %s: %w", dev, mnt, err)
	}
	p.owned = true
	if err := p.prepare(ctx); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// prepare enables quotas and makes the top-level folders.
func (p *Pool) prepare(ctx context.Context) error {
	for _, d := range []string{"volumes", "snapshots"} {
		if err := os.MkdirAll(filepath.Join(p.mnt, d), 0o755); err != nil {
			return fmt.Errorf("storage: %w", err)
		}
	}
	return p.enableQuota(ctx)
}

// quotaCtlArgs is struct btrfs_ioctl_quota_ctl_args.
type quotaCtlArgs struct {
	cmd    uint64
	status uint64
}

const (
	// iocQuotaCtl is BTRFS_IOC_QUOTA_CTL: _IOWR(0x94, 40, 16 bytes).
	iocQuotaCtl = 0xC0109428
	// quotaCtlEnableSimple is BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA (Linux 6.7).
	quotaCtlEnableSimple = 4
)

// enableQuota turns quotas on. It prefers simple quotas (Linux 6.7+):
// they account by extent owner, so snapshotting an image costs the same
// whatever its size, where full quota groups walk the snapshot's shared
// tree blocks at creation. Debian 12's btrfs-progs cannot enable them, so
// it is one ioctl; a kernel without them gets full quotas from the tool. A
// pool whose quotas are on already keeps its kind.
func (p *Pool) enableQuota(ctx context.Context) error {
	if out, err := btrfsTool(ctx, "qgroup", "show", p.mnt); err == nil && len(out) > 0 {
		return nil // quotas are on already
	}
	dir, err := os.Open(p.mnt)
	if err != nil {
		return fmt.Errorf("storage: %w", err)
	}
	defer dir.Close()
	args := quotaCtlArgs{cmd: quotaCtlEnableSimple}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, dir.Fd(), iocQuotaCtl, uintptr(unsafe.Pointer(&args))); errno == 0 {
		return nil
	}
	_, err = btrfsTool(ctx, "quota", "enable", p.mnt)
	return err
}

// Mountpoint returns where the pool is mounted.
func (p *Pool) Mountpoint() string { return p.mnt }

// Close unmounts the pool if Open mounted it. A loop device goes with it.
func (p *Pool) Close() error {
	if !p.owned {
		return nil
	}
	p.owned = false
	if err := unix.Unmount(p.mnt, 0); err != nil {
		return fmt.Errorf("storage: unmount %s: %w", p.mnt, err)
	}
	return nil
}

// Usage is a pool's or volume's space in bytes.
type Usage struct {
	Total int64 `json:"total"`
	Used  int64 `json:"used"`
	Free  int64 `json:"free"`
}

// Usage reports the pool's total, used and free bytes.
func (p *Pool) Usage() (Usage, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(p.mnt, &st); err != nil {
		return Usage{}, fmt.Errorf("storage: statfs: %w", err)
	}
	bs := int64(st.Bsize)
	total, free := int64(st.Blocks)*bs, int64(st.Bavail)*bs
	return Usage{Total: total, Used: total - int64(st.Bfree)*bs, Free: free}, nil
}

type diskState int

const (
	isEmpty diskState = iota
	isBtrfs
	holdsData
)

// inspect tells whether a device or file is empty (all zeros in its first
// MiB and at the btrfs superblock), already btrfs, or holds something else.
func inspect(path string) (diskState, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("storage: %w", err)
	}
	defer f.Close()
	magic := make([]byte, len(btrfsMagic))
	if _, err := f.ReadAt(magic, btrfsMagicOffset); err == nil && string(magic) == btrfsMagic {
		return isBtrfs, nil
	}
	buf := make([]byte, 1<<20)
	n, err := io.ReadFull(f, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return 0, fmt.Errorf("storage: read %s: %w", path, err)
	}
	if bytes.Count(buf[:n], []byte{0}) == n {
		return isEmpty, nil
	}
	return holdsData, nil
}

// ensureFile creates a sparse pool file of size bytes if it does not exist.
func ensureFile(path string, size int64) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	if size < 256<<20 {
		return fmt.Errorf("storage: pool file %s does not exist; give a size of at least 256 MiB to create it", path)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("storage: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("storage: create pool file: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		os.Remove(path)
		return fmt.Errorf("storage: size pool file: %w", err)
	}
	return nil
}

// mkfs formats dev as btrfs. mkfs.btrfs is a tool call: there is no Go
// library that writes a btrfs filesystem.
func mkfs(ctx context.Context, dev string, force bool) error {
	args := []string{"-q", "-L", "writ-pool"}
	if force {
		args = append(args, "-f")
	}
	out, err := exec.CommandContext(ctx, "mkfs.btrfs", append(args, dev)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("storage: mkfs.btrfs %s: %v: %s", dev, err, bytes.TrimSpace(out))
	}
	return nil
}

// btrfsTool runs the btrfs tool (btrfs-progs) for what no library covers:
// quota groups.
func btrfsTool(ctx context.Context, args ...string) ([]byte, error) {
	out, err := exec.CommandContext(ctx, "btrfs", args...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("storage: btrfs %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}

// isBtrfsMount reports whether path is a btrfs mountpoint.
func isBtrfsMount(path string) (bool, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false, fmt.Errorf("storage: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// Fields: id parent major:minor root mountpoint options ... - fstype source
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || fields[4] != path {
			continue
		}
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) && fields[i+1] == "btrfs" {
				return true, nil
			}
		}
	}
	return false, sc.Err()
}

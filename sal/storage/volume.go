package storage

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/btrfs/v2"
	"golang.org/x/sys/unix"
)

var nameRe = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,62}$`)

// ValidName reports whether s is a valid volume or snapshot name: lower-case
// letters, digits, '.', '_' and '-', 1–63 characters, not starting with a
// dot and not "..": no path tricks.
func ValidName(s string) bool { return nameRe.MatchString(s) && !strings.Contains(s, "..") }

func checkName(kind, s string) error {
	if !ValidName(s) {
		return fmt.Errorf("storage: %s name %q: %w (lower-case letters, digits, . _ -; up to 63)", kind, s, ErrInvalidName)
	}
	return nil
}

// Volume is a volume's state.
type Volume struct {
	Name string `json:"name"`
	Path string `json:"path"`
	// Limit is the size limit in bytes; 0 means none.
	Limit int64 `json:"limit"`
	// Used is the bytes the volume references.
	Used int64 `json:"used"`
	// Disk is the disk file of a volume cloned from an image (EnsureClone);
	// empty for other volumes.
	Disk string `json:"disk,omitempty"`
}

func (p *Pool) volumePath(name string) string { return filepath.Join(p.mnt, "volumes", name) }

func (p *Pool) snapshotPath(vol, snap string) string {
	return filepath.Join(p.mnt, "snapshots", vol, snap)
}

func exists(path string) bool { _, err := os.Lstat(path); return err == nil }

// EnsureVolume makes the volume if it does not exist and sets its size
// limit (bytes; 0 for none). Calling it again with the same arguments
// changes nothing.
func (p *Pool) EnsureVolume(ctx context.Context, name string, limit int64) (Volume, error) {
	if err := checkName("volume", name); err != nil {
		return Volume{}, err
	}
	if limit < 0 {
		return Volume{}, errors.New("storage: a size limit cannot be negative")
	}
	path := p.volumePath(name)
	if !exists(path) {
		if err := btrfs.SubvolCreate(path); err != nil {
			return Volume{}, fmt.Errorf("storage: create volume %s: %w", name, err)
		}
	}
	if err := p.setLimit(ctx, path, limit); err != nil {
		return Volume{}, err
	}
	return p.Volume(ctx, name)
}

// ResizeVolume sets an existing volume's size limit (0 for none). A limit
// below what the volume holds stops further writes; it deletes nothing.
func (p *Pool) ResizeVolume(ctx context.Context, name string, limit int64) (Volume, error) {
	if err := checkName("volume", name); err != nil {
		return Volume{}, err
	}
	if !exists(p.volumePath(name)) {
		return Volume{}, fmt.Errorf("storage: volume %s: %w", name, ErrNotFound)
	}
	return p.EnsureVolume(ctx, name, limit)
}

func (p *Pool) setLimit(ctx context.Context, path string, limit int64) error {
	size := "none"
	if limit > 0 {
		size = strconv.FormatInt(limit, 10)
	}
	_, err := btrfsTool(ctx, "qgroup", "limit", size, path)
	return err
}

// Volume returns a volume's state.
func (p *Pool) Volume(ctx context.Context, name string) (Volume, error) {
	if err := checkName("volume", name); err != nil {
		return Volume{}, err
	}
	path := p.volumePath(name)
	if !exists(path) {
		return Volume{}, fmt.Errorf("storage: volume %s: %w", name, ErrNotFound)
	}
	q, err := p.qgroups(ctx)
	if err != nil {
		return Volume{}, err
	}
	id, err := btrfs.SubvolID(path)
	if err != nil {
		return Volume{}, fmt.Errorf("storage: volume %s: %w", name, err)
	}
	g := q[id]
	return Volume{Name: name, Path: path, Limit: g.maxRfer, Used: g.rfer}, nil
}

// Volumes lists the pool's volumes, by name.
func (p *Pool) Volumes(ctx context.Context) ([]Volume, error) {
	entries, err := os.ReadDir(filepath.Join(p.mnt, "volumes"))
	if err != nil {
		return nil, fmt.Errorf("storage: list volumes: %w", err)
	}
	var out []Volume
	for _, e := range entries {
		if !e.IsDir() || !ValidName(e.Name()) {
			continue // a restore in progress (dot names) or a stray file
		}
		v, err := p.Volume(ctx, e.Name())
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// DeleteVolume removes a volume (not its snapshots). Deleting a missing
// volume is not an error. A volume held by a user (see Hold) is refused.
func (p *Pool) DeleteVolume(ctx context.Context, name string) error {
	if err := checkName("volume", name); err != nil {
		return err
	}
	if holders := p.holders(name); len(holders) > 0 {
		return fmt.Errorf("storage: volume %s is in use by %s; release it first", name, strings.Join(holders, ", "))
	}
	path := p.volumePath(name)
	if !exists(path) {
		return nil
	}
	if err := btrfs.SubvolDelete(path); err != nil {
		return fmt.Errorf("storage: delete volume %s: %w", name, err)
	}
	return nil
}

// Hold marks a volume as used by holder (a VM, say), so it cannot be
// deleted; Release removes the mark. Both are idempotent.
func (p *Pool) Hold(name, holder string) error {
	if err := checkName("volume", name); err != nil {
		return err
	}
	if err := checkName("holder", holder); err != nil {
		return err
	}
	dir := filepath.Join(p.mnt, "holds", name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("storage: %w", err)
	}
	return os.WriteFile(filepath.Join(dir, holder), nil, 0o644)
}

// Release removes holder's mark on a volume.
func (p *Pool) Release(name, holder string) error {
	if err := checkName("volume", name); err != nil {
		return err
	}
	err := os.Remove(filepath.Join(p.mnt, "holds", name, holder))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("storage: %w", err)
	}
	return nil
}

func (p *Pool) holders(name string) []string {
	entries, _ := os.ReadDir(filepath.Join(p.mnt, "holds", name))
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// Snapshot makes a read-only snapshot of a volume; an existing snapshot of
// that name is kept as it is.
func (p *Pool) Snapshot(ctx context.Context, vol, snap string) (string, error) {
	if err := checkName("volume", vol); err != nil {
		return "", err
	}
	if err := checkName("snapshot", snap); err != nil {
		return "", err
	}
	src, dst := p.volumePath(vol), p.snapshotPath(vol, snap)
	if !exists(src) {
		return "", fmt.Errorf("storage: volume %s: %w", vol, ErrNotFound)
	}
	if exists(dst) {
		return dst, nil
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return "", fmt.Errorf("storage: %w", err)
	}
	if err := btrfs.SubvolSnapshot(dst, src, true); err != nil {
		return "", fmt.Errorf("storage: snapshot %s of %s: %w", snap, vol, err)
	}
	return dst, nil
}

// Snapshots lists a volume's snapshots, by name.
func (p *Pool) Snapshots(vol string) ([]string, error) {
	if err := checkName("volume", vol); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(filepath.Join(p.mnt, "snapshots", vol))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("storage: %w", err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	sort.Strings(out)
	return out, nil
}

// DeleteSnapshot removes a snapshot; a missing one is not an error.
func (p *Pool) DeleteSnapshot(ctx context.Context, vol, snap string) error {
	if err := checkName("volume", vol); err != nil {
		return err
	}
	if err := checkName("snapshot", snap); err != nil {
		return err
	}
	path := p.snapshotPath(vol, snap)
	if !exists(path) {
		return nil
	}
	if err := btrfs.SubvolDelete(path); err != nil {
		return fmt.Errorf("storage: delete snapshot %s of %s: %w", snap, vol, err)
	}
	return nil
}

// Restore replaces a volume's contents with a snapshot's, keeping the
// volume's size limit. The new contents are in place (a writable snapshot
// of the snapshot, renamed over the volume) before the old ones go.
func (p *Pool) Restore(ctx context.Context, vol, snap string) (Volume, error) {
	if err := checkName("volume", vol); err != nil {
		return Volume{}, err
	}
	if err := checkName("snapshot", snap); err != nil {
		return Volume{}, err
	}
	src := p.snapshotPath(vol, snap)
	if !exists(src) {
		return Volume{}, fmt.Errorf("storage: snapshot %s of %s: %w", snap, vol, ErrNotFound)
	}
	var limit int64
	if old, err := p.Volume(ctx, vol); err == nil {
		limit = old.Limit
	}
	stamp := strconv.FormatInt(time.Now().UnixNano(), 36)
	tmp := filepath.Join(p.mnt, "volumes", ".restore-"+vol+"-"+stamp)
	if err := btrfs.SubvolSnapshot(tmp, src, false); err != nil {
		return Volume{}, fmt.Errorf("storage: restore %s from %s: %w", vol, snap, err)
	}
	path := p.volumePath(vol)
	old := filepath.Join(p.mnt, "volumes", ".old-"+vol+"-"+stamp)
	if exists(path) {
		if err := os.Rename(path, old); err != nil {
			btrfs.SubvolDelete(tmp)
			return Volume{}, fmt.Errorf("storage: restore %s: %w", vol, err)
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Rename(old, path)
		btrfs.SubvolDelete(tmp)
		return Volume{}, fmt.Errorf("storage: restore %s: %w", vol, err)
	}
	if exists(old) {
		if err := btrfs.SubvolDelete(old); err != nil {
			return Volume{}, fmt.Errorf("storage: restore %s: remove the old contents: %w", vol, err)
		}
	}
	if err := p.setLimit(ctx, path, limit); err != nil {
		return Volume{}, err
	}
	return p.Volume(ctx, vol)
}

// cleanRel checks that rel is a plain relative path: no "..", no leading
// "/", nothing to clean.
func cleanRel(vol, rel string) (string, error) {
	clean := filepath.Clean("/" + rel)[1:]
	if clean == "" || clean != rel {
		return "", fmt.Errorf("storage: path %q inside volume %s: %w (use a plain relative path)", rel, vol, ErrInvalidName)
	}
	return clean, nil
}

// openIn opens rel inside the volume without following symlinks or
// leaving the volume (openat2 with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS).
func (p *Pool) openIn(vol, rel string, flags int, mode uint32) (*os.File, error) {
	if err := checkName("volume", vol); err != nil {
		return nil, err
	}
	root, err := os.Open(p.volumePath(vol))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("storage: volume %s: %w", vol, ErrNotFound)
		}
		return nil, fmt.Errorf("storage: %w", err)
	}
	defer root.Close()
	clean, err := cleanRel(vol, rel)
	if err != nil {
		return nil, err
	}
	fd, err := unix.Openat2(int(root.Fd()), clean, &unix.OpenHow{
		Flags:   uint64(flags | unix.O_CLOEXEC),
		Mode:    uint64(mode),
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return nil, fmt.Errorf("storage: open %s in volume %s: %w", rel, vol, err)
	}
	return os.NewFile(uintptr(fd), filepath.Join(p.volumePath(vol), clean)), nil
}

// WriteFile writes data to rel inside a volume (creating or replacing it).
// The data goes to a temporary file renamed over rel only once complete, so
// a failed write (past the volume's size limit: an error wrapping ErrQuota)
// leaves the volume as it was.
func (p *Pool) WriteFile(vol, rel string, data []byte) error {
	if _, err := cleanRel(vol, rel); err != nil {
		return err
	}
	// rel must not be a symlink (or lead through one); a missing rel is a
	// new file.
	if f, err := p.openIn(vol, rel, unix.O_PATH, 0); err == nil {
		f.Close()
	} else if !errors.Is(err, unix.ENOENT) {
		return err
	}
	tmpRel := filepath.Join(filepath.Dir(rel), ".writ-tmp-"+strconv.FormatInt(time.Now().UnixNano(), 36)+"-"+filepath.Base(rel))
	f, err := p.openIn(vol, tmpRel, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	_, werr := f.Write(data)
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(f.Name(), filepath.Join(p.volumePath(vol), rel))
	}
	if werr != nil {
		os.Remove(f.Name())
	}
	if errors.Is(werr, unix.EDQUOT) {
		return fmt.Errorf("storage: write %s in volume %s: %w (%d bytes did not fit)", rel, vol, ErrQuota, len(data))
	}
	if werr != nil {
		return fmt.Errorf("storage: write %s in volume %s: %w", rel, vol, werr)
	}
	return nil
}

// ReadFile reads rel inside a volume, up to max bytes.
func (p *Pool) ReadFile(vol, rel string, max int64) ([]byte, error) {
	f, err := p.openIn(vol, rel, unix.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() > max {
		return nil, fmt.Errorf("storage: %s in volume %s is %d bytes, more than %d", rel, vol, st.Size(), max)
	}
	buf := make([]byte, st.Size())
	if _, err := f.ReadAt(buf, 0); err != nil && st.Size() > 0 {
		return nil, fmt.Errorf("storage: read %s in volume %s: %w", rel, vol, err)
	}
	return buf, nil
}

// qgroup is one line of `btrfs qgroup show`.
type qgroup struct{ rfer, maxRfer int64 }

// qgroups returns the level-0 quota groups (one per subvolume) by subvolume
// ID. --sync makes the numbers current.
func (p *Pool) qgroups(ctx context.Context) (map[uint64]qgroup, error) {
	out, err := btrfsTool(ctx, "qgroup", "show", "-r", "--raw", "--sync", p.mnt)
	if err != nil {
		return nil, err
	}
	res := map[uint64]qgroup{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || !strings.HasPrefix(f[0], "0/") {
			continue
		}
		id, err := strconv.ParseUint(strings.TrimPrefix(f[0], "0/"), 10, 64)
		if err != nil {
			continue
		}
		rfer, _ := strconv.ParseInt(f[1], 10, 64)
		var max int64
		if f[3] != "none" {
			max, _ = strconv.ParseInt(f[3], 10, 64)
		}
		res[id] = qgroup{rfer: rfer, maxRfer: max}
	}
	return res, nil
}

package storage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/writ-fleet/writ/sal/internal/poolfile"
)

// Fake is an in-memory stand-in for a Pool with the same contract (see
// contract_test.go): names, limits, quota errors, holds, snapshots,
// restore, images verified by sha256, clones. It is for fast tests of
// code above the storage layer, never a proof that storage works.
type Fake struct {
	// ImageAllow is Config.ImageAllow of the fake.
	ImageAllow ImagePolicy

	mu     sync.Mutex
	size   int64
	vols   map[string]*fakeVol            // guarded by mu
	snaps  map[string]map[string]*fakeVol // guarded by mu; volume → name → frozen copy
	images map[string][]byte              // guarded by mu
	holds  map[string]map[string]bool     // guarded by mu
}

type fakeVol struct {
	limit int64
	files map[string][]byte
}

func (v *fakeVol) used() int64 {
	var n int64
	for _, f := range v.files {
		n += int64(len(f))
	}
	return n
}

func (v *fakeVol) clone() *fakeVol {
	c := &fakeVol{limit: v.limit, files: map[string][]byte{}}
	for k, f := range v.files {
		c.files[k] = f
	}
	return c
}

// NewFake returns an empty fake pool of size bytes.
func NewFake(size int64) *Fake {
	return &Fake{size: size, vols: map[string]*fakeVol{}, snaps: map[string]map[string]*fakeVol{},
		images: map[string][]byte{}, holds: map[string]map[string]bool{}}
}

func (f *Fake) volume(name string) (Volume, error) {
	v, ok := f.vols[name]
	if !ok {
		return Volume{}, fmt.Errorf("storage: volume %s: %w", name, ErrNotFound)
	}
	return Volume{Name: name, Path: "/fake/volumes/" + name, Limit: v.limit, Used: v.used()}, nil
}

// EnsureVolume implements the Pool contract.
func (f *Fake) EnsureVolume(_ context.Context, name string, limit int64) (Volume, error) {
	if err := checkName("volume", name); err != nil {
		return Volume{}, err
	}
	if limit < 0 {
		return Volume{}, fmt.Errorf("storage: a size limit cannot be negative")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.vols[name]
	if !ok {
		v = &fakeVol{files: map[string][]byte{}}
		f.vols[name] = v
	}
	v.limit = limit
	return f.volume(name)
}

// ResizeVolume implements the Pool contract.
func (f *Fake) ResizeVolume(ctx context.Context, name string, limit int64) (Volume, error) {
	f.mu.Lock()
	_, ok := f.vols[name]
	f.mu.Unlock()
	if !ok && ValidName(name) {
		return Volume{}, fmt.Errorf("storage: volume %s: %w", name, ErrNotFound)
	}
	return f.EnsureVolume(ctx, name, limit)
}

// DeleteVolume implements the Pool contract.
func (f *Fake) DeleteVolume(_ context.Context, name string) error {
	if err := checkName("volume", name); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.holds[name]) > 0 {
		var hs []string
		for h := range f.holds[name] {
			hs = append(hs, h)
		}
		sort.Strings(hs)
		return fmt.Errorf("storage: volume %s is in use by %s; release it first", name, strings.Join(hs, ", "))
	}
	delete(f.vols, name)
	return nil
}

// Hold implements the Pool contract.
func (f *Fake) Hold(name, holder string) error {
	if err := checkName("volume", name); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.holds[name] == nil {
		f.holds[name] = map[string]bool{}
	}
	f.holds[name][holder] = true
	return nil
}

// Release implements the Pool contract.
func (f *Fake) Release(name, holder string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.holds[name], holder)
	return nil
}

// Volume implements the Pool contract.
func (f *Fake) Volume(_ context.Context, name string) (Volume, error) {
	if err := checkName("volume", name); err != nil {
		return Volume{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.volume(name)
}

// Volumes implements the Pool contract.
func (f *Fake) Volumes(_ context.Context) ([]Volume, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []Volume
	for name := range f.vols {
		v, _ := f.volume(name)
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func fakePath(vol, rel string) (string, error) {
	clean := path.Clean("/" + rel)[1:]
	if clean == "" || clean != rel {
		return "", fmt.Errorf("storage: path %q inside volume %s: %w (use a plain relative path)", rel, vol, ErrInvalidName)
	}
	return clean, nil
}

// WriteFile implements the Pool contract.
func (f *Fake) WriteFile(vol, rel string, data []byte) error {
	if err := checkName("volume", vol); err != nil {
		return err
	}
	p, err := fakePath(vol, rel)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.vols[vol]
	if !ok {
		return fmt.Errorf("storage: volume %s: %w", vol, ErrNotFound)
	}
	if v.limit > 0 && v.used()-int64(len(v.files[p]))+int64(len(data)) > v.limit {
		return fmt.Errorf("storage: write %s in volume %s: %w (%d bytes did not fit)", rel, vol, ErrQuota, len(data))
	}
	v.files[p] = append([]byte(nil), data...)
	return nil
}

// ReadFile implements the Pool contract.
func (f *Fake) ReadFile(vol, rel string, max int64) ([]byte, error) {
	if err := checkName("volume", vol); err != nil {
		return nil, err
	}
	p, err := fakePath(vol, rel)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.vols[vol]
	if !ok {
		return nil, fmt.Errorf("storage: volume %s: %w", vol, ErrNotFound)
	}
	b, ok := v.files[p]
	if !ok {
		return nil, fmt.Errorf("storage: open %s in volume %s: %w", rel, vol, ErrNotFound)
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("storage: %s in volume %s is %d bytes, more than %d", rel, vol, len(b), max)
	}
	return append([]byte(nil), b...), nil
}

// Snapshot implements the Pool contract.
func (f *Fake) Snapshot(_ context.Context, vol, snap string) (string, error) {
	if err := checkName("volume", vol); err != nil {
		return "", err
	}
	if err := checkName("snapshot", snap); err != nil {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.vols[vol]
	if !ok {
		return "", fmt.Errorf("storage: volume %s: %w", vol, ErrNotFound)
	}
	if f.snaps[vol] == nil {
		f.snaps[vol] = map[string]*fakeVol{}
	}
	if _, ok := f.snaps[vol][snap]; !ok {
		f.snaps[vol][snap] = v.clone()
	}
	return "/fake/snapshots/" + vol + "/" + snap, nil
}

// Snapshots implements the Pool contract.
func (f *Fake) Snapshots(vol string) ([]string, error) {
	if err := checkName("volume", vol); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for s := range f.snaps[vol] {
		out = append(out, s)
	}
	sort.Strings(out)
	return out, nil
}

// DeleteSnapshot implements the Pool contract.
func (f *Fake) DeleteSnapshot(_ context.Context, vol, snap string) error {
	if err := checkName("volume", vol); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.snaps[vol], snap)
	return nil
}

// Restore implements the Pool contract.
func (f *Fake) Restore(_ context.Context, vol, snap string) (Volume, error) {
	if err := checkName("volume", vol); err != nil {
		return Volume{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.snaps[vol][snap]
	if !ok {
		return Volume{}, fmt.Errorf("storage: snapshot %s of %s: %w", snap, vol, ErrNotFound)
	}
	limit := int64(0)
	if old, ok := f.vols[vol]; ok {
		limit = old.limit
	}
	nv := s.clone()
	nv.limit = limit
	f.vols[vol] = nv
	return f.volume(vol)
}

// Usage implements the Pool contract.
func (f *Fake) Usage() (Usage, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var used int64
	for _, v := range f.vols {
		used += v.used()
	}
	for _, img := range f.images {
		used += int64(len(img))
	}
	return Usage{Total: f.size, Used: used, Free: f.size - used}, nil
}

// EnsureImage implements the Pool contract: it downloads url (once) and
// checks the sha256.
func (f *Fake) EnsureImage(ctx context.Context, url, sha string) (Image, error) {
	if !shaRe.MatchString(sha) {
		return Image{}, fmt.Errorf("storage: image sha256 %q must be 64 lower-case hex digits", sha)
	}
	f.mu.Lock()
	if b, ok := f.images[sha]; ok {
		f.mu.Unlock()
		return Image{SHA256: sha, Path: "/fake/images/" + sha + "/" + ImageFile, Size: int64(len(b))}, nil
	}
	f.mu.Unlock()
	if _, err := checkImageURL(url); err != nil {
		return Image{}, fmt.Errorf("storage: download %s: %w", url, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return Image{}, err
	}
	resp, err := imageClient(f.ImageAllow).Do(req)
	if err != nil {
		return Image{}, fmt.Errorf("storage: download %s: %w", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, DefaultMaxImageBytes))
	if err != nil {
		return Image{}, fmt.Errorf("storage: download %s: %w", url, err)
	}
	sum := sha256.Sum256(b)
	if got := hex.EncodeToString(sum[:]); got != sha {
		return Image{}, fmt.Errorf("storage: image %s: %w: the download does not have sha256 %s (removed)", url, ErrChecksum, sha)
	}
	f.mu.Lock()
	f.images[sha] = b
	f.mu.Unlock()
	return Image{SHA256: sha, Path: "/fake/images/" + sha + "/" + ImageFile, Size: int64(len(b))}, nil
}

// EnsureClone implements the Pool contract.
func (f *Fake) EnsureClone(_ context.Context, sha, name string, limit int64) (Volume, error) {
	if err := checkName("volume", name); err != nil {
		return Volume{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	img, ok := f.images[sha]
	if !ok {
		return Volume{}, fmt.Errorf("storage: image %s: %w (EnsureImage first)", sha, ErrNotFound)
	}
	v, ok := f.vols[name]
	if !ok {
		v = &fakeVol{files: map[string][]byte{ImageFile: img}}
		f.vols[name] = v
	}
	v.limit = limit
	return Volume{Name: name, Path: "/fake/volumes/" + name, Limit: limit, Disk: "/fake/volumes/" + name + "/" + ImageFile}, nil
}

// Holds is Pool.Holds for the fake's paths: a file of one of its volumes
// (/fake/volumes/NAME/…) or images (/fake/images/SHA256/disk.img).
func (f *Fake) Holds(path string) (file File, volume string, err error) {
	clean := filepath.Clean(path)
	parts := strings.Split(strings.TrimPrefix(clean, "/fake/"), "/")
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case !strings.HasPrefix(clean, "/fake/"):
	case len(parts) >= 3 && parts[0] == "volumes" && f.vols[parts[1]] != nil:
		return poolfile.Make(clean), parts[1], nil
	case len(parts) == 3 && parts[0] == "images" && f.images[parts[1]] != nil && parts[2] == ImageFile:
		return poolfile.Make(clean), "", nil
	}
	return File{}, "", fmt.Errorf("%q is not in a volume or a cached image: %w", path, ErrNotInPool)
}

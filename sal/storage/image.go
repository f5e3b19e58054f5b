package storage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"github.com/containerd/btrfs/v2"
	"golang.org/x/sync/singleflight"
	"golang.org/x/sys/unix"
)

// ImageFile is the name of the disk file inside an image and its clones.
const ImageFile = "disk.img"

// Defaults for downloading images.
const (
	downloadTries   = 4
	downloadTimeout = 30 * time.Minute
	// stallTimeout fails a download that receives nothing for this long.
	stallTimeout = time.Minute
)

// ErrChecksum is returned when a download's sha256 is not the one asked for.
var ErrChecksum = errors.New("sha256 mismatch")

var shaRe = regexp.MustCompile(`^[0-9a-f]{64}$`)

// Image is a cached image: a read-only subvolume named by its sha256.
type Image struct {
	SHA256 string `json:"sha256"`
	Path   string `json:"path"` // the disk file
	Size   int64  `json:"size"`
}

// images deduplicates concurrent downloads of one image in this process;
// an flock on the image's lock file does it across processes.
var images singleflight.Group

func (p *Pool) imageDir(sha string) string { return filepath.Join(p.mnt, "images", sha) }

// EnsureImage returns the image with the given sha256, downloading it from
// url first if the pool does not have it. The download is resumed where
// the server allows, retried with backoff, and verified before anything can
// use it: a file whose sha256 differs is removed and ErrChecksum returned.
// Concurrent calls for one image download it once.
func (p *Pool) EnsureImage(ctx context.Context, url, sha string) (Image, error) {
	if !shaRe.MatchString(sha) {
		return Image{}, fmt.Errorf("storage: image sha256 %q must be 64 lower-case hex digits", sha)
	}
	if img, ok := p.image(sha); ok {
		return img, nil
	}
	v, err, _ := images.Do(p.mnt+"/"+sha, func() (any, error) {
		return p.download(ctx, url, sha)
	})
	if err != nil {
		return Image{}, err
	}
	return v.(Image), nil
}

func (p *Pool) image(sha string) (Image, bool) {
	path := filepath.Join(p.imageDir(sha), ImageFile)
	st, err := os.Stat(path)
	if err != nil {
		return Image{}, false
	}
	return Image{SHA256: sha, Path: path, Size: st.Size()}, true
}

func (p *Pool) download(ctx context.Context, url, sha string) (Image, error) {
	dir := filepath.Join(p.mnt, "images")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Image{}, fmt.Errorf("storage: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock-"+sha), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return Image{}, fmt.Errorf("storage: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return Image{}, fmt.Errorf("storage: lock image %s: %w", sha, err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)
	if img, ok := p.image(sha); ok { // another process finished it meanwhile
		return img, nil
	}
	// The download goes into a writable subvolume that becomes the image
	// only once verified; a partial one from an earlier try is resumed.
	partial := filepath.Join(dir, ".partial-"+sha)
	if !exists(partial) {
		if err := btrfs.SubvolCreate(partial); err != nil {
			return Image{}, fmt.Errorf("storage: %w", err)
		}
	}
	file := filepath.Join(partial, ImageFile)
	var lastErr error
	for try := 0; try < downloadTries; try++ {
		if try > 0 {
			select {
			case <-ctx.Done():
				return Image{}, ctx.Err()
			case <-time.After(time.Duration(1<<try) * time.Second):
			}
		}
		if lastErr = p.fetch(ctx, url, file); lastErr == nil {
			break
		}
		if ctx.Err() != nil {
			return Image{}, ctx.Err()
		}
		if errors.Is(lastErr, ErrImageRefused) {
			break // the policy says no; asking again will not change that
		}
	}
	if lastErr != nil {
		if errors.Is(lastErr, ErrImageRefused) {
			btrfs.SubvolDelete(partial) // nothing of a refused download is kept
		}
		return Image{}, fmt.Errorf("storage: download %s: %w", url, lastErr)
	}
	got, err := fileSHA256(file)
	if err != nil {
		return Image{}, err
	}
	if got != sha {
		// The error does not say what was fetched (its hash would tell a
		// script about a server it may not read).
		btrfs.SubvolDelete(partial)
		return Image{}, fmt.Errorf("storage: image %s: %w: the download does not have sha256 %s (removed)", url, ErrChecksum, sha)
	}
	if err := btrfs.SubvolSnapshot(p.imageDir(sha), partial, true); err != nil {
		return Image{}, fmt.Errorf("storage: keep image %s: %w", sha, err)
	}
	if err := btrfs.SubvolDelete(partial); err != nil {
		return Image{}, fmt.Errorf("storage: %w", err)
	}
	img, _ := p.image(sha)
	return img, nil
}

// fetch downloads url into file, continuing from file's size when the
// server answers a range request with 206. The URL, every redirect and
// every address connected to are held to the pool's policy (see
// imageClient), and the download to MaxImageBytes.
func (p *Pool) fetch(ctx context.Context, url, file string) error {
	if _, err := checkImageURL(url); err != nil {
		return err
	}
	max := p.cfg.MaxImageBytes
	f, err := os.OpenFile(file, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	have, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, downloadTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if have > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(have, 10)+"-")
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusPartialContent && have > 0:
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && have > 0:
		return nil // we have it all already
	case resp.StatusCode == http.StatusOK:
		if err := f.Truncate(0); err != nil {
			return err
		}
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return err
		}
	default:
		return fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	if resp.ContentLength > max || have > max {
		return fmt.Errorf("%w: the image is larger than the limit of %d bytes", ErrImageRefused, max)
	}
	written := have
	if resp.StatusCode == http.StatusOK {
		written = 0
	}
	// A stalled connection fails after stallTimeout without data.
	stall := time.AfterFunc(stallTimeout, cancel)
	defer stall.Stop()
	buf := make([]byte, 1<<20)
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			stall.Reset(stallTimeout)
			if written += int64(n); written > max {
				return fmt.Errorf("%w: the image is larger than the limit of %d bytes", ErrImageRefused, max)
			}
			if _, err := f.Write(buf[:n]); err != nil {
				return err
			}
		}
		if rerr == io.EOF {
			return f.Sync()
		}
		if rerr != nil {
			return rerr
		}
	}
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("storage: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("storage: hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Images lists the cached images.
func (p *Pool) Images() ([]Image, error) {
	entries, err := os.ReadDir(filepath.Join(p.mnt, "images"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("storage: %w", err)
	}
	var out []Image
	for _, e := range entries {
		if img, ok := p.image(e.Name()); ok && shaRe.MatchString(e.Name()) {
			out = append(out, img)
		}
	}
	return out, nil
}

// EnsureClone makes volume name a writable snapshot of an image: a VM disk
// whose file is ImageFile inside the volume. It takes constant time and no
// extra space whatever the image's size; blocks are copied only when
// written. A volume that exists already is kept as it is (it may have been
// written to), with limit applied (0: none). With simple quotas (Linux
// 6.7+, see enableQuota) a clone's usage and limit count only what the
// clone writes itself: the image's blocks belong to the image. The returned
// Volume does not report Used (that needs a quota sync; ask Volume for it).
func (p *Pool) EnsureClone(ctx context.Context, sha, name string, limit int64) (Volume, error) {
	if err := checkName("volume", name); err != nil {
		return Volume{}, err
	}
	img, ok := p.image(sha)
	if !ok {
		return Volume{}, fmt.Errorf("storage: image %s: %w (EnsureImage first)", sha, ErrNotFound)
	}
	path := p.volumePath(name)
	created := false
	if !exists(path) {
		if err := btrfs.SubvolSnapshot(path, filepath.Dir(img.Path), false); err != nil {
			return Volume{}, fmt.Errorf("storage: clone image %s into %s: %w", sha, name, err)
		}
		created = true
	}
	// A new snapshot has no limit; set one only when asked, or when an
	// existing volume may carry another.
	if limit > 0 || !created {
		if err := p.setLimit(ctx, path, limit); err != nil {
			return Volume{}, err
		}
	}
	return Volume{Name: name, Path: path, Limit: limit, Disk: filepath.Join(path, ImageFile)}, nil
}

package storage

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/btrfs/v2"
	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/internal/testenv"
)

// benchPool is a pool big enough for an 8 GiB image and its copies.
func benchPool(b *testing.B) *Pool {
	testenv.RequireRoot(b)
	testenv.RequireBinary(b, "mkfs.btrfs")
	dir := b.TempDir()
	p, err := Open(context.Background(), Config{File: filepath.Join(dir, "pool.img"), Size: 24 << 30, Mountpoint: filepath.Join(dir, "mnt"), ImageAllow: testAllow})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	return p
}

// makeImage writes a size-byte image straight into the cache (no download)
// and returns its cache name.
func makeImage(b *testing.B, p *Pool, size int64) string {
	name := fmt.Sprintf("%064x", size)
	partial := filepath.Join(p.mnt, "images", ".partial-"+name)
	os.MkdirAll(filepath.Dir(partial), 0o755)
	if err := btrfs.SubvolCreate(partial); err != nil {
		b.Fatal(err)
	}
	f, err := os.Create(filepath.Join(partial, ImageFile))
	if err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, 4<<20)
	for i := range chunk {
		chunk[i] = byte(i*7 + 1) // not zeros: real extents
	}
	for written := int64(0); written < size; written += int64(len(chunk)) {
		if _, err := f.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	f.Sync()
	f.Close()
	if err := btrfs.SubvolSnapshot(p.imageDir(name), partial, true); err != nil {
		b.Fatal(err)
	}
	btrfs.SubvolDelete(partial)
	return name
}

// BenchmarkClone: cloning an image into a VM disk takes the same time
// whatever the image's size.
func BenchmarkClone(b *testing.B) {
	p := benchPool(b)
	sizes := []int64{1, 2, 8}
	imgs := map[int64]string{}
	for _, gib := range sizes {
		imgs[gib] = makeImage(b, p, gib<<30)
	}
	// Deleting the temporary subvolumes left btrfs's cleaner freeing
	// gigabytes in the background; wait for it so it does not run during
	// the clones being timed.
	unix.Sync()
	if _, err := btrfsTool(context.Background(), "subvolume", "sync", p.mnt); err != nil {
		b.Fatal(err)
	}
	for _, gib := range sizes {
		img := imgs[gib]
		b.Run(fmt.Sprintf("%dGiB", gib), func(b *testing.B) {
			for i := 0; b.Loop(); i++ {
				if _, err := p.EnsureClone(context.Background(), img, fmt.Sprintf("c%d-%d", gib, i), 0); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkCopy: copying the image file instead, the cost clones avoid.
func BenchmarkCopy(b *testing.B) {
	p := benchPool(b)
	for _, gib := range []int64{1, 2} {
		img := makeImage(b, p, gib<<30)
		b.Run(fmt.Sprintf("%dGiB", gib), func(b *testing.B) {
			for i := 0; b.Loop(); i++ {
				v, err := p.EnsureVolume(context.Background(), fmt.Sprintf("k%d-%d", gib, i), 0)
				if err != nil {
					b.Fatal(err)
				}
				src, _ := os.Open(filepath.Join(p.imageDir(img), ImageFile))
				dst, _ := os.Create(filepath.Join(v.Path, ImageFile))
				if _, err := io.Copy(struct{ io.Writer }{dst}, src); err != nil { // plain copy, no reflink
					b.Fatal(err)
				}
				dst.Sync()
				src.Close()
				dst.Close()
			}
		})
	}
}

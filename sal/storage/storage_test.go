package storage

import (
	"bytes"
	"context"
	"errors"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/writ-fleet/writ/internal/testenv"
)

// testAllow lets the tests' image servers (httptest, on loopback) be
// reached; the tests of the policy itself name their own.
var testAllow = ImagePolicy{Ranges: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}

// newPool makes a pool on a sparse loop-backed file under the test's temp
// folder, unmounted (and its loop device detached) when the test ends,
// failed or not.
func newPool(t *testing.T) (*Pool, Config) {
	t.Helper()
	return newPoolSized(t, 1<<30)
}

func newPoolSized(t *testing.T, size int64) (*Pool, Config) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, "mkfs.btrfs")
	dir := t.TempDir()
	cfg := Config{File: filepath.Join(dir, "pool.img"), Size: size, Mountpoint: filepath.Join(dir, "mnt"), ImageAllow: testAllow}
	p, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("close pool: %v", err)
		}
	})
	return p, cfg
}

func TestPool_VolumesAndQuota(t *testing.T) {
	p, _ := newPool(t)
	ctx := context.Background()
	const limit = 8 << 20
	a, err := p.EnsureVolume(ctx, "data-a", limit)
	if err != nil {
		t.Fatal(err)
	}
	if a.Limit != limit {
		t.Errorf("limit = %d, want %d", a.Limit, limit)
	}
	if again, err := p.EnsureVolume(ctx, "data-a", limit); err != nil || again.Limit != limit {
		t.Errorf("second EnsureVolume = %+v, %v", again, err)
	}
	if _, err := p.EnsureVolume(ctx, "data-b", 0); err != nil {
		t.Fatal(err)
	}
	if err := p.WriteFile("data-a", "small", bytes.Repeat([]byte("x"), 1<<20)); err != nil {
		t.Fatalf("write within the limit: %v", err)
	}
	// Past the limit: a clear error, and the pool and other volumes are
	// unharmed.
	err = p.WriteFile("data-a", "big", make([]byte, 16<<20))
	if !errors.Is(err, ErrQuota) {
		t.Fatalf("write past the limit = %v, want ErrQuota", err)
	}
	if !strings.Contains(err.Error(), "data-a") {
		t.Errorf("quota error %q does not name the volume", err)
	}
	if err := p.WriteFile("data-b", "big", make([]byte, 16<<20)); err != nil {
		t.Errorf("write to another volume after the quota error: %v", err)
	}
	if got, err := p.ReadFile("data-a", "small", 2<<20); err != nil || len(got) != 1<<20 {
		t.Errorf("read back = %d bytes, %v", len(got), err)
	}
	vols, err := p.Volumes(ctx)
	if err != nil || len(vols) != 2 || vols[0].Name != "data-a" || vols[1].Used < 16<<20 {
		t.Errorf("Volumes = %+v, %v", vols, err)
	}
	u, err := p.Usage()
	if err != nil || u.Total < 900<<20 || u.Free <= 0 || u.Used <= 0 {
		t.Errorf("Usage = %+v, %v", u, err)
	}
	// Resizing lifts the limit.
	if _, err := p.ResizeVolume(ctx, "data-a", 64<<20); err != nil {
		t.Fatal(err)
	}
	if err := p.WriteFile("data-a", "big", make([]byte, 16<<20)); err != nil {
		t.Errorf("write after resize: %v", err)
	}
	// Held volumes are not deleted; released ones are; twice is fine.
	if err := p.Hold("data-b", "vm-1"); err != nil {
		t.Fatal(err)
	}
	if err := p.DeleteVolume(ctx, "data-b"); err == nil || !strings.Contains(err.Error(), "in use by vm-1") {
		t.Errorf("delete of a held volume = %v", err)
	}
	p.Release("data-b", "vm-1")
	for i := 0; i < 2; i++ {
		if err := p.DeleteVolume(ctx, "data-b"); err != nil {
			t.Errorf("delete #%d = %v", i+1, err)
		}
	}
	if _, err := p.Volume(ctx, "data-b"); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleted volume = %v, want ErrNotFound", err)
	}
}

func TestPool_Names(t *testing.T) {
	p, _ := newPool(t)
	ctx := context.Background()
	for _, name := range []string{"", "..", "../x", "a/b", ".hidden", "UPPER", strings.Repeat("x", 64), "a..b"} {
		if _, err := p.EnsureVolume(ctx, name, 0); !errors.Is(err, ErrInvalidName) {
			t.Errorf("EnsureVolume(%q) = %v, want ErrInvalidName", name, err)
		}
	}
	if _, err := p.EnsureVolume(ctx, "v", 0); err != nil {
		t.Fatal(err)
	}
	outside := filepath.Join(filepath.Dir(p.Mountpoint()), "outside")
	os.WriteFile(outside, []byte("secret"), 0o600)
	os.Symlink(outside, filepath.Join(p.volumePath("v"), "link"))
	for _, rel := range []string{"../volumes/x", "/etc/passwd", "a/../../b", "link", ""} {
		if err := p.WriteFile("v", rel, []byte("x")); err == nil {
			t.Errorf("WriteFile(%q) escaped or was accepted", rel)
		}
	}
	if b, _ := os.ReadFile(outside); string(b) != "secret" {
		t.Errorf("file outside the volume was changed: %q", b)
	}
}

func TestPool_SnapshotRestore(t *testing.T) {
	p, _ := newPool(t)
	ctx := context.Background()
	if _, err := p.EnsureVolume(ctx, "db", 32<<20); err != nil {
		t.Fatal(err)
	}
	p.WriteFile("db", "state", []byte("v1"))
	for i := 0; i < 2; i++ { // idempotent
		if _, err := p.Snapshot(ctx, "db", "before"); err != nil {
			t.Fatal(err)
		}
	}
	p.WriteFile("db", "state", []byte("v2"))
	// A snapshot is read-only.
	if err := os.WriteFile(filepath.Join(p.snapshotPath("db", "before"), "state"), []byte("x"), 0o644); err == nil {
		t.Error("wrote into a snapshot")
	}
	v, err := p.Restore(ctx, "db", "before")
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := p.ReadFile("db", "state", 10); string(got) != "v1" {
		t.Errorf("after restore state = %q, want v1", got)
	}
	if v.Limit != 32<<20 {
		t.Errorf("limit after restore = %d, want %d", v.Limit, 32<<20)
	}
	snaps, _ := p.Snapshots("db")
	if len(snaps) != 1 || snaps[0] != "before" {
		t.Errorf("Snapshots = %v", snaps)
	}
	if vols, _ := p.Volumes(ctx); len(vols) != 1 {
		t.Errorf("volumes after restore = %+v, want just db", vols)
	}
	if err := p.DeleteSnapshot(ctx, "db", "before"); err != nil {
		t.Fatal(err)
	}
}

// TestPool_Reopen: a pool survives being closed and opened again (a runner
// restart or a reboot): volumes are found, nothing is reformatted.
func TestPool_Reopen(t *testing.T) {
	p, cfg := newPool(t)
	ctx := context.Background()
	p.EnsureVolume(ctx, "keep", 8<<20)
	p.WriteFile("keep", "f", []byte("still here"))
	data, sha := randomImage(t, 1<<20)
	hs := httptest.NewServer(&imageServer{data: data})
	defer hs.Close()
	if _, err := p.EnsureImage(ctx, hs.URL, sha); err != nil {
		t.Fatal(err)
	}
	// Already mounted: Open uses the mount as it is.
	p2, err := Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	p2.Close() // not the owner: a no-op
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	p3, err := Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p3.Close()
	if got, err := p3.ReadFile("keep", "f", 100); err != nil || string(got) != "still here" {
		t.Errorf("after reopen = %q, %v", got, err)
	}
	if v, err := p3.Volume(ctx, "keep"); err != nil || v.Limit != 8<<20 {
		t.Errorf("volume after reopen = %+v, %v", v, err)
	}
	if imgs, err := p3.Images(); err != nil || len(imgs) != 1 || imgs[0].SHA256 != sha {
		t.Errorf("images after reopen = %+v, %v", imgs, err)
	}
}

// TestOpen_RefusesData: a file holding something else is never formatted
// unless forced.
func TestOpen_RefusesData(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, "mkfs.btrfs")
	dir := t.TempDir()
	file := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(file, append([]byte("precious data"), make([]byte, 300<<20)...), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := Config{File: file, Mountpoint: filepath.Join(dir, "mnt")}
	if _, err := Open(context.Background(), cfg); !errors.Is(err, ErrHoldsData) {
		t.Fatalf("Open of a file with data = %v, want ErrHoldsData", err)
	}
	if b, _ := os.ReadFile(file); !bytes.HasPrefix(b, []byte("precious data")) {
		t.Fatal("the file was changed")
	}
	cfg.Force = true
	p, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("forced Open = %v", err)
	}
	p.Close()
}

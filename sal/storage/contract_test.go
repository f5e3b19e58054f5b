package storage

import (
	"context"
	"errors"
	"net/http/httptest"
	"strings"
	"testing"
)

// store is the contract every storage implementation keeps.
type store interface {
	EnsureVolume(ctx context.Context, name string, limit int64) (Volume, error)
	ResizeVolume(ctx context.Context, name string, limit int64) (Volume, error)
	DeleteVolume(ctx context.Context, name string) error
	Hold(name, holder string) error
	Release(name, holder string) error
	Volume(ctx context.Context, name string) (Volume, error)
	Volumes(ctx context.Context) ([]Volume, error)
	WriteFile(vol, rel string, data []byte) error
	ReadFile(vol, rel string, max int64) ([]byte, error)
	Snapshot(ctx context.Context, vol, snap string) (string, error)
	Snapshots(vol string) ([]string, error)
	DeleteSnapshot(ctx context.Context, vol, snap string) error
	Restore(ctx context.Context, vol, snap string) (Volume, error)
	Usage() (Usage, error)
	EnsureImage(ctx context.Context, url, sha string) (Image, error)
	EnsureClone(ctx context.Context, sha, name string, limit int64) (Volume, error)
}

var (
	_ store = (*Pool)(nil)
	_ store = (*Fake)(nil)
)

// runContract checks the behaviour callers rely on, against any store.
func runContract(t *testing.T, s store) {
	ctx := context.Background()
	t.Run("ensure is idempotent", func(t *testing.T) {
		for i := 0; i < 2; i++ {
			v, err := s.EnsureVolume(ctx, "c-vol", 4<<20)
			if err != nil || v.Limit != 4<<20 || v.Name != "c-vol" {
				t.Fatalf("EnsureVolume #%d = %+v, %v", i+1, v, err)
			}
		}
	})
	t.Run("names", func(t *testing.T) {
		for _, bad := range []string{"", "..", "a/b", "UP"} {
			if _, err := s.EnsureVolume(ctx, bad, 0); !errors.Is(err, ErrInvalidName) {
				t.Errorf("EnsureVolume(%q) = %v, want ErrInvalidName", bad, err)
			}
		}
		if err := s.WriteFile("c-vol", "../escape", []byte("x")); !errors.Is(err, ErrInvalidName) {
			t.Errorf("WriteFile(../escape) = %v, want ErrInvalidName", err)
		}
	})
	t.Run("quota", func(t *testing.T) {
		if err := s.WriteFile("c-vol", "ok", make([]byte, 1<<20)); err != nil {
			t.Fatal(err)
		}
		if err := s.WriteFile("c-vol", "too-big", make([]byte, 8<<20)); !errors.Is(err, ErrQuota) {
			t.Errorf("write past the limit = %v, want ErrQuota", err)
		}
		if b, err := s.ReadFile("c-vol", "ok", 2<<20); err != nil || len(b) != 1<<20 {
			t.Errorf("ReadFile = %d bytes, %v", len(b), err)
		}
	})
	t.Run("missing", func(t *testing.T) {
		if _, err := s.Volume(ctx, "c-none"); !errors.Is(err, ErrNotFound) {
			t.Errorf("Volume(missing) = %v, want ErrNotFound", err)
		}
		if _, err := s.ResizeVolume(ctx, "c-none", 1); !errors.Is(err, ErrNotFound) {
			t.Errorf("ResizeVolume(missing) = %v, want ErrNotFound", err)
		}
		if err := s.DeleteVolume(ctx, "c-none"); err != nil {
			t.Errorf("DeleteVolume(missing) = %v, want nil", err)
		}
	})
	t.Run("snapshot and restore", func(t *testing.T) {
		s.WriteFile("c-vol", "state", []byte("one"))
		if _, err := s.Snapshot(ctx, "c-vol", "s1"); err != nil {
			t.Fatal(err)
		}
		s.WriteFile("c-vol", "state", []byte("two"))
		v, err := s.Restore(ctx, "c-vol", "s1")
		if err != nil || v.Limit != 4<<20 {
			t.Fatalf("Restore = %+v, %v", v, err)
		}
		if b, _ := s.ReadFile("c-vol", "state", 10); string(b) != "one" {
			t.Errorf("restored state = %q", b)
		}
		if snaps, _ := s.Snapshots("c-vol"); len(snaps) != 1 || snaps[0] != "s1" {
			t.Errorf("Snapshots = %v", snaps)
		}
	})
	t.Run("holds", func(t *testing.T) {
		s.Hold("c-vol", "vm-a")
		if err := s.DeleteVolume(ctx, "c-vol"); err == nil || !strings.Contains(err.Error(), "vm-a") {
			t.Errorf("delete of a held volume = %v", err)
		}
		s.Release("c-vol", "vm-a")
		if err := s.DeleteVolume(ctx, "c-vol"); err != nil {
			t.Errorf("delete after release = %v", err)
		}
	})
	t.Run("images and clones", func(t *testing.T) {
		data, sha := randomImage(t, 1<<20)
		hs := httptest.NewServer(&imageServer{data: data})
		defer hs.Close()
		_, wrong := randomImage(t, 1)
		if _, err := s.EnsureImage(ctx, hs.URL, wrong); !errors.Is(err, ErrChecksum) {
			t.Errorf("EnsureImage(wrong sha) = %v, want ErrChecksum", err)
		}
		if _, err := s.EnsureClone(ctx, wrong, "c-disk", 0); !errors.Is(err, ErrNotFound) {
			t.Errorf("EnsureClone(no image) = %v, want ErrNotFound", err)
		}
		img, err := s.EnsureImage(ctx, hs.URL, sha)
		if err != nil || img.Size != int64(len(data)) {
			t.Fatalf("EnsureImage = %+v, %v", img, err)
		}
		if _, err := s.EnsureClone(ctx, sha, "c-disk", 0); err != nil {
			t.Fatal(err)
		}
		if b, err := s.ReadFile("c-disk", ImageFile, 2<<20); err != nil || len(b) != len(data) {
			t.Errorf("clone's disk = %d bytes, %v", len(b), err)
		}
	})
}

func TestContract_Fake(t *testing.T) {
	runContract(t, func() *Fake { f := NewFake(1 << 30); f.ImageAllow = testAllow; return f }())
}

func TestContract_Pool(t *testing.T) {
	p, _ := newPool(t)
	runContract(t, p)
}

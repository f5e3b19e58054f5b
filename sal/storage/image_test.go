package storage

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// imageServer serves data with range support; the first request is cut
// after cutAt bytes when cutAt > 0. It counts requests and bytes sent.
type imageServer struct {
	data     []byte
	cutAt    int
	requests atomic.Int64
	sent     atomic.Int64
}

func (s *imageServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := s.requests.Add(1)
	if n == 1 && s.cutAt > 0 {
		// Send part of the body, then drop the connection.
		w.Header().Set("Content-Length", strconv.Itoa(len(s.data)))
		w.WriteHeader(http.StatusOK)
		w.Write(s.data[:s.cutAt])
		s.sent.Add(int64(s.cutAt))
		if hj, ok := w.(http.Hijacker); ok {
			conn, _, _ := hj.Hijack()
			conn.Close()
		}
		return
	}
	cw := &countingWriter{ResponseWriter: w, n: &s.sent}
	http.ServeContent(cw, r, "disk.img", time.Time{}, bytes.NewReader(s.data))
}

type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	c.n.Add(int64(len(b)))
	return c.ResponseWriter.Write(b)
}

func randomImage(t testing.TB, size int) ([]byte, string) {
	data := make([]byte, size)
	rand.Read(data)
	sum := sha256.Sum256(data)
	return data, hex.EncodeToString(sum[:])
}

func TestPool_EnsureImage(t *testing.T) {
	p, _ := newPool(t)
	ctx := context.Background()
	data, sha := randomImage(t, 24<<20)
	srv := &imageServer{data: data}
	hs := httptest.NewServer(srv)
	defer hs.Close()

	// Ten concurrent jobs ask for the same image: one download.
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := p.EnsureImage(ctx, hs.URL+"/disk.img", sha); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if n := srv.requests.Load(); n != 1 {
		t.Errorf("image downloaded %d times, want once", n)
	}
	img, err := p.EnsureImage(ctx, hs.URL+"/disk.img", sha)
	if err != nil || img.Size != int64(len(data)) {
		t.Fatalf("EnsureImage = %+v, %v", img, err)
	}
	if err := os.WriteFile(img.Path, []byte("x"), 0o644); err == nil {
		t.Error("a cached image is writable")
	}

	// A wrong checksum leaves nothing behind.
	_, wrong := randomImage(t, 10)
	if _, err := p.EnsureImage(ctx, hs.URL+"/disk.img", wrong); !errors.Is(err, ErrChecksum) {
		t.Errorf("EnsureImage with a wrong sha256 = %v, want ErrChecksum", err)
	}
	if exists(p.imageDir(wrong)) || exists(filepath.Join(p.mnt, "images", ".partial-"+wrong)) {
		t.Error("a rejected download left files behind")
	}
	if imgs, _ := p.Images(); len(imgs) != 1 {
		t.Errorf("Images = %+v, want one", imgs)
	}
}

func TestPool_EnsureImage_Resume(t *testing.T) {
	p, _ := newPool(t)
	data, sha := randomImage(t, 16<<20)
	srv := &imageServer{data: data, cutAt: 10 << 20}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	if _, err := p.EnsureImage(context.Background(), hs.URL+"/disk.img", sha); err != nil {
		t.Fatal(err)
	}
	// The second request asked only for the rest.
	if sent := srv.sent.Load(); sent > int64(len(data))+(1<<20) {
		t.Errorf("sent %d bytes for a %d-byte image after a cut: not resumed", sent, len(data))
	}
}

// TestPool_EnsureClone clones a 2 GiB image (64 MiB with -short) into ten
// VM disks.
func TestPool_EnsureClone(t *testing.T) {
	p, _ := newPoolSized(t, 6<<30)
	ctx := context.Background()
	size := 2 << 30
	if testing.Short() {
		size = 64 << 20
	}
	data, sha := randomImage(t, size)
	hs := httptest.NewServer(&imageServer{data: data})
	defer hs.Close()
	if _, err := p.EnsureImage(ctx, hs.URL+"/disk.img", sha); err != nil {
		t.Fatal(err)
	}
	// Let the download's own writes settle before measuring.
	unix.Sync()
	before, _ := p.Usage()
	for i := 0; i < 10; i++ {
		v, err := p.EnsureClone(ctx, sha, "disk-"+strconv.Itoa(i), 0)
		if err != nil {
			t.Fatal(err)
		}
		// Writable, and the image below is untouched.
		if i == 0 {
			if err := p.WriteFile(v.Name, "disk.img", []byte("changed")); err != nil {
				t.Fatal(err)
			}
		}
	}
	after, _ := p.Usage()
	if grew := after.Used - before.Used; grew > int64(len(data)) {
		t.Errorf("ten clones of a %d-byte image used %d more bytes, want far less than one copy", len(data), grew)
	}
	img, _ := p.image(sha)
	if got, _ := fileSHA256(img.Path); got != sha {
		t.Error("writing a clone changed the image")
	}
	// Again: kept as it is.
	if _, err := p.EnsureClone(ctx, sha, "disk-0", 0); err != nil {
		t.Fatal(err)
	}
	if got, _ := p.ReadFile("disk-0", "disk.img", 100); string(got) != "changed" {
		t.Errorf("re-ensured clone was reset: %q", got)
	}
}

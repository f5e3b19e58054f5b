package storage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestAllowedAddr(t *testing.T) {
	loop := []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	for _, tc := range []struct {
		addr  string
		allow []netip.Prefix
		want  bool
	}{
		{"8.8.8.8", nil, true},
		{"2001:4860:4860::8888", nil, true},
		{"127.0.0.1", nil, false},
		{"127.0.0.1", loop, true},
		{"127.0.0.2", loop, false},
		{"::1", nil, false},
		{"::ffff:127.0.0.1", nil, false},
		{"10.1.2.3", nil, false},
		{"172.16.0.1", nil, false},
		{"192.168.1.1", nil, false},
		{"169.254.169.254", nil, false}, // cloud metadata
		{"fe80::1", nil, false},
		{"fd00::1", nil, false},
		{"100.64.0.1", nil, false},
		{"224.0.0.1", nil, false},
		{"0.0.0.0", nil, false},
		{"240.0.0.1", nil, false},
	} {
		if got := allowedAddr(netip.MustParseAddr(tc.addr), tc.allow); got != tc.want {
			t.Errorf("allowedAddr(%s, %v) = %v, want %v", tc.addr, tc.allow, got, tc.want)
		}
	}
}

func TestImagePolicy_Servers(t *testing.T) {
	var p ImagePolicy
	for _, v := range []string{"127.0.0.1:7706", "10.0.0.0/8"} {
		if err := p.ParseImageAllow(v); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.ParseImageAllow("lots"); err == nil {
		t.Error("ParseImageAllow(lots) = nil error")
	}
	for ap, want := range map[string]bool{"127.0.0.1:7706": true, "127.0.0.1:6379": false, "10.9.9.9:1": true, "192.168.0.1:80": false, "8.8.8.8:443": true} {
		if got := p.allows(netip.MustParseAddrPort(ap)); got != want {
			t.Errorf("allows(%s) = %v, want %v", ap, got, want)
		}
	}
}

func TestCheckImageURL(t *testing.T) {
	for raw, ok := range map[string]bool{
		"https://images.example/disk.img": true,
		"http://10.0.0.1:8080/disk.img":   true, // the address is checked when connecting
		"file:///etc/shadow":              false,
		"ftp://images.example/disk.img":   false,
		"https://user:pw@images.example/": false,
		"/disk.img":                       false,
		"gopher://x":                      false,
	} {
		if _, err := checkImageURL(raw); (err == nil) != ok {
			t.Errorf("checkImageURL(%s) = %v, want ok %v", raw, err, ok)
		}
	}
}

// TestImageClient: the address policy holds where the connection is made,
// for redirects too.
func TestImageClient(t *testing.T) {
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("image")) }))
	defer ok.Close()
	// A second server on another loopback address, and one that redirects
	// there.
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Skipf("cannot listen on 127.0.0.2: %v", err)
	}
	other := &httptest.Server{Listener: ln, Config: &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("secret")) })}}
	other.Start()
	defer other.Close()
	redirect := httptest.NewServer(http.RedirectHandler(other.URL+"/", http.StatusFound))
	defer redirect.Close()

	get := func(allow []netip.Prefix, url string) error {
		resp, err := imageClient(ImagePolicy{Ranges: allow}).Get(url)
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	only1 := []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	if err := get(nil, ok.URL); !errors.Is(err, ErrImageRefused) {
		t.Errorf("loopback with no allowance = %v, want ErrImageRefused", err)
	}
	if err := get(only1, ok.URL); err != nil {
		t.Errorf("allowed loopback = %v", err)
	}
	if err := get(only1, redirect.URL); !errors.Is(err, ErrImageRefused) || !strings.Contains(err.Error(), "127.0.0.2") {
		t.Errorf("redirect to an address not allowed = %v, want ErrImageRefused", err)
	}
}

// TestPool_EnsureImage_Refused: a download the policy refuses (a loopback
// server the pool does not allow, or an image past the size limit) fails
// with ErrImageRefused, is not retried, and leaves nothing in the pool.
func TestPool_EnsureImage_Refused(t *testing.T) {
	p, _ := newPool(t)
	data := []byte(strings.Repeat("x", 4096))
	sum := sha256.Sum256(data)
	sha := hex.EncodeToString(sum[:])
	srv := &imageServer{data: data}
	hs := httptest.NewServer(srv)
	defer hs.Close()

	strict := *p
	strict.client = imageClient(ImagePolicy{})
	if _, err := strict.EnsureImage(context.Background(), hs.URL+"/disk.img", sha); !errors.Is(err, ErrImageRefused) {
		t.Errorf("EnsureImage from loopback, not allowed = %v, want ErrImageRefused", err)
	}
	if n := srv.requests.Load(); n != 0 {
		t.Errorf("the refused server got %d requests, want none", n)
	}
	small := *p
	small.cfg.MaxImageBytes = 1024
	if _, err := small.EnsureImage(context.Background(), hs.URL+"/disk.img", sha); !errors.Is(err, ErrImageRefused) || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("EnsureImage past the size limit = %v, want ErrImageRefused", err)
	}
	if _, err := p.EnsureImage(context.Background(), "file:///etc/shadow", sha); !errors.Is(err, ErrImageRefused) {
		t.Errorf("EnsureImage(file://) = %v, want ErrImageRefused", err)
	}
	left, _ := filepath.Glob(filepath.Join(p.mnt, "images", ".partial-*"))
	if len(left) > 0 {
		t.Errorf("refused downloads left %v", left)
	}
	if _, err := os.Stat(p.imageDir(sha)); err == nil {
		t.Error("a refused download became an image")
	}
}

// TestPool_Holds: only files of the pool's volumes and cached images pass;
// a host path, a device, a path that climbs out, and a symlink in a volume
// that points out are refused.
func TestPool_Holds(t *testing.T) {
	p, _ := newPool(t)
	ctx := context.Background()
	v, err := p.EnsureVolume(ctx, "data", 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WriteFile("data", "disk.img", []byte("disk")); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(v.Path, "evil")
	if err := os.Symlink("/etc/shadow", link); err != nil {
		t.Fatal(err)
	}
	if got, vol, err := p.Holds(filepath.Join(v.Path, "disk.img")); err != nil || got.Path() != filepath.Join(v.Path, "disk.img") || vol != v.Name {
		t.Errorf("Holds(a volume's file) = %q, %q, %v", got, vol, err)
	}
	for _, bad := range []string{"/etc/passwd", "/dev/sda", "/dev/null", link, filepath.Join(v.Path, "..", "..", "..", "etc", "passwd"), p.mnt, filepath.Join(p.mnt, "volumes")} {
		if _, _, err := p.Holds(bad); !errors.Is(err, ErrNotInPool) {
			t.Errorf("Holds(%s) = %v, want ErrNotInPool", bad, err)
		}
	}
}

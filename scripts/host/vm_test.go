package host

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"github.com/writ-fleet/writ/scripts"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/sal/storage"
	"github.com/writ-fleet/writ/sal/vm"
)

// recordingVMs is a VM layer that records what it is asked to create.
type recordingVMs struct{ created []vm.Spec }

func (r *recordingVMs) Create(ctx context.Context, spec vm.Spec) (vm.Info, error) {
	r.created = append(r.created, spec)
	return vm.Info{Name: spec.Name, Spec: spec}, nil
}
func (r *recordingVMs) Start(ctx context.Context, name string) (vm.Info, error) {
	return vm.Info{}, nil
}
func (r *recordingVMs) Stop(ctx context.Context, name string, grace time.Duration) (vm.Info, error) {
	return vm.Info{}, nil
}
func (r *recordingVMs) Delete(ctx context.Context, name string) error                { return nil }
func (r *recordingVMs) Info(ctx context.Context, name string) (vm.Info, error)       { return vm.Info{}, nil }
func (r *recordingVMs) List(ctx context.Context) ([]vm.Info, error)                  { return nil, nil }
func (r *recordingVMs) Console(ctx context.Context, n string, m int) (string, error) { return "", nil }

// TestVMModule_Confined: a VM gets only files of the node's storage pool
// (clones and cached images); a host path or device is refused before the
// VM layer sees it.
func TestVMModule_Confined(t *testing.T) {
	data := []byte("kernel")
	sum := sha256.Sum256(data)
	sha := hex.EncodeToString(sum[:])
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(data) }))
	defer hs.Close()
	fake := storage.NewFake(1 << 30)
	fake.ImageAllow = storage.ImagePolicy{Ranges: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}
	vms := &recordingVMs{}
	e := scripts.New(scripts.Config{}, Modules(Layers{Storage: fake, VMs: vms}))
	run := func(kernel, disk string) string {
		t.Helper()
		script := fmt.Sprintf(`storage := import("storage"); vm := import("vm"); job := import("job")
img := storage.image(%q, %q)
d := storage.clone(img.sha256, "d1", "1G")
kernel := %s
disk := %s
r := vm.create({name: "v", kernel: kernel, disks: [disk]})
job.result(is_error(r) ? string(r.value) : "created")`, hs.URL, sha, kernel, disk)
		out, err := e.Run(context.Background(), script, scripts.Input{JobID: "j", Owner: "alice", Attempt: 1})
		if err != nil {
			t.Fatalf("scripts.Run = %v", err)
		}
		return string(out.Result)
	}
	if got := run("img.path", "d.disk"); got != `"created"` || len(vms.created) != 1 {
		t.Fatalf("create from the pool = %s (%d created)", got, len(vms.created))
	}
	for _, tc := range []struct{ kernel, disk string }{
		{`"/etc/passwd"`, "d.disk"},
		{"img.path", `"/dev/sda"`},
		{"img.path", `"/fake/volumes/../../etc/shadow"`},
		{"img.path", `"/fake/volumes/nope/disk.img"`},
	} {
		if got := run(tc.kernel, tc.disk); !strings.Contains(got, "not in a volume or a cached image") {
			t.Errorf("create with kernel %s, disk %s = %s, want refused", tc.kernel, tc.disk, got)
		}
	}
	if len(vms.created) != 1 {
		t.Errorf("%d VMs reached the VM layer, want only the confined one", len(vms.created))
	}
}

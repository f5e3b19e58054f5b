package qemu

import (
	"fmt"
	"github.com/writ-fleet/writ/sal/internal/poolfile"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/writ-fleet/writ/internal/guest"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/sal/vm"
)

// BenchmarkDeploy compares, on the same guest and network, the time from
// "go" to the guest serving HTTP: writ (attach a NIC, create, start
// through Machines) against the same QEMU command launched by hand on a
// tap made in advance. Run with -benchtime 3x (make bench-vm).
func BenchmarkDeploy(b *testing.B) {
	for _, mode := range []string{"writ", "by-hand"} {
		b.Run(mode, func(b *testing.B) {
			r := newRig(b)
			var network, boot time.Duration
			for i := 0; i < b.N; i++ {
				name := fmt.Sprintf("b%d", i)
				t0 := time.Now()
				nic, err := r.host.Attach(r.ctx, "web", name, 0)
				if err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				spec := vm.Spec{Name: name, CPUs: 1, MemoryMiB: 256, Kernel: poolfile.Make(r.art.Kernel), Initrd: poolfile.Make(r.art.Initrd), Cmdline: guest.Cmdline,
					Disks: []vm.Disk{{Path: poolfile.Make(r.disk)}},
					NICs:  []vm.NIC{{Tap: nic.Tap, MAC: nic.MAC, Address: netip.PrefixFrom(nic.Addr, 24), Gateway: nic.Gateway}}}
				if mode == "writ" {
					if _, err := r.m.Create(r.ctx, spec); err != nil {
						b.Fatal(err)
					}
					if _, err := r.m.Start(r.ctx, name); err != nil {
						b.Fatal(err)
					}
				} else {
					// The command writ would run, typed by hand: the seed is
					// made beforehand, as a person would.
					t1 = r.byHand(b, spec)
				}
				waitHTTP(b, r, nic.Addr)
				network += t1.Sub(t0)
				boot += time.Since(t1)
				b.StopTimer()
				r.m.Delete(r.ctx, name)
				testenv.KillUnder(filepath.Join(r.dir, "hand-"+name))
				r.host.Detach(r.ctx, "web", name, 0)
				b.StartTimer()
			}
			b.ReportMetric(float64(network.Milliseconds())/float64(b.N), "network-ms/op")
			b.ReportMetric(float64(boot.Milliseconds())/float64(b.N), "boot-to-http-ms/op")
		})
	}
}

// byHand launches spec's QEMU command itself (seed prepared first) and
// returns when it started.
func (r *rig) byHand(b *testing.B, spec vm.Spec) time.Time {
	dir := filepath.Join(r.dir, "hand-"+spec.Name)
	os.MkdirAll(dir, 0o755)
	seed := filepath.Join(dir, "seed.iso")
	if err := vm.WriteSeed(seed, spec); err != nil {
		b.Fatal(err)
	}
	backend := r.cfg.Backend.(*Backend)
	args := backend.Args(vm.Launch{Spec: spec, Dir: dir, Seed: seed, Console: filepath.Join(dir, "console.log")}, AccelTCG)
	t1 := time.Now()
	err := r.host.Do(func() error {
		out, err := exec.Command(backend.cfg.Binary, args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	return t1
}

func waitHTTP(b *testing.B, r *rig, addr netip.Addr) {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if body, err := testenv.HTTPGet(b, r.node, addr.String()+":80", "/"); err == nil && body == page {
			return
		}
		if time.Now().After(deadline) {
			b.Fatal("the guest did not serve HTTP within 2 minutes")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

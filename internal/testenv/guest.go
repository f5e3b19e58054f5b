package testenv

import (
	"context"
	"os/exec"
	"testing"

	"github.com/writ-fleet/writ/internal/guest"
)

// Guest returns the tiny test guest's kernel and initramfs, built once per
// machine into guest.DefaultCacheDir() (the kernel comes from apt). It
// skips without QEMU, and fails when the guest cannot be built.
func Guest(t testing.TB) guest.Artifacts {
	t.Helper()
	RequireRoot(t)
	RequireBinary(t, "qemu-system-x86_64")
	for _, tool := range []string{"apt-get", "dpkg-deb", "busybox"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("building the test guest needs %s (make test installs busybox-static)", tool)
		}
	}
	a, err := guest.Build(context.Background(), guest.DefaultCacheDir())
	if err != nil {
		t.Fatalf("build the test guest: %v", err)
	}
	return a
}

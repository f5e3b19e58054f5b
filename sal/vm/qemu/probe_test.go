package qemu

import (
	"context"
	"testing"

	"github.com/writ-fleet/writ/internal/testenv"
)

// TestProbeAccel boots the probe's boot sector under TCG (it must pass:
// that proves the probe can say yes) and reports what auto picks here.
func TestProbeAccel(t *testing.T) {
	bin := testenv.RequireBinary(t, DefaultBinary)
	if !accelWorks(context.Background(), bin, AccelTCG) {
		t.Fatal("the probe's boot sector does not run under TCG: the probe could never say yes")
	}
	t.Logf("auto acceleration on this machine: %s", ProbeAccel(context.Background(), bin))
}

package testenv

import (
	"runtime"
	"testing"

	"github.com/vishvananda/netns"
)

// NetNS moves the test's goroutine, locked to its thread, into a fresh
// anonymous network namespace until the test ends. The namespace has no
// name to forget: it disappears with its last thread and handle, so a
// failed test leaves no namespace, link or rule behind. Run the code under
// test on the test's goroutine.
func NetNS(t *testing.T) netns.NsHandle {
	t.Helper()
	RequireRoot(t)
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	ns, err := netns.New() // also switches this thread into it
	if err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		t.Fatalf("new network namespace: %v", err)
	}
	t.Cleanup(func() {
		// Back to the original namespace before the thread is released,
		// so no other goroutine ever runs in the test's namespace.
		if err := netns.Set(orig); err != nil {
			t.Errorf("restore network namespace: %v (this thread is now tainted)", err)
			return // keep the thread locked: Go will discard it
		}
		ns.Close()
		orig.Close()
		runtime.UnlockOSThread()
	})
	return ns
}

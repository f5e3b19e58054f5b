package testenv

import (
	"fmt"
	"os"
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

// NewNetNS makes a fresh anonymous network namespace without entering it
// (the caller's thread stays where it is) and returns a handle to it, closed
// when the test ends; the namespace goes with its last handle and thread.
func NewNetNS(t testing.TB) netns.NsHandle {
	t.Helper()
	RequireRoot(t)
	var ns netns.NsHandle
	var err error
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		orig, gerr := netns.Get()
		if gerr != nil {
			err = gerr
			runtime.UnlockOSThread()
			return
		}
		defer orig.Close()
		ns, err = netns.New()
		if serr := netns.Set(orig); serr != nil {
			err = serr
			return // leave the thread locked: Go discards it
		}
		runtime.UnlockOSThread()
	}()
	<-done
	if err != nil {
		t.Fatalf("new network namespace: %v", err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

// InNetNS runs fn on a thread inside ns and waits for it. Sockets fn
// opens stay in ns after it returns.
func InNetNS(t testing.TB, ns netns.NsHandle, fn func() error) error {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- err // thread stays locked and is discarded
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// NetNSPath is a path other processes can open to enter ns, valid while
// the test holds the handle.
func NetNSPath(ns netns.NsHandle) string {
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(ns))
}

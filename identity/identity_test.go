package identity

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/ledger"
)

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestAgent_RegisterAndReport: a wrong token shows on the status line and
// is retried; with the right one the same key registers, reports, and
// sends a last report when stopped.
func TestAgent_RegisterAndReport(t *testing.T) {
	l := testenv.NewLedger(t, ledger.Site{Name: "lab", SupervisorURL: "http://127.0.0.1:1"})
	admin := &ledger.Client{BaseURL: l.URL, Key: l.Admin}
	ctx := context.Background()
	tok, err := admin.CreateToken(ctx, "lab", 0)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var status syncBuffer
	a, err := New(Config{StateDir: dir, AllowTmpfs: true, LedgerURL: l.URL, Site: "lab", Token: "writ-enroll-wrong", Status: &status, Interval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	if _, err := a.Register(rctx); err == nil {
		t.Fatal("registered with a wrong token")
	}
	cancel()
	if !strings.Contains(status.String(), "NOT registered") || !strings.Contains(status.String(), "bad_token") && !strings.Contains(status.String(), "enrollment token") {
		t.Errorf("status after a wrong token:\n%s", status.String())
	}

	// The same state directory keeps the same key, and so the same ID.
	b, err := New(Config{StateDir: dir, AllowTmpfs: true, LedgerURL: l.URL, Site: "lab", Token: tok.Secret, Status: &status, Interval: 50 * time.Millisecond,
		Used: func() ledger.Capacity { return ledger.Capacity{CPUs: 1, MemoryMiB: 256} }})
	if err != nil {
		t.Fatal(err)
	}
	if b.ID() != a.ID() {
		t.Fatalf("node ID changed across restarts: %s, then %s", a.ID(), b.ID())
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- b.Run(runCtx) }()
	testenv.WaitFor(t, 10*time.Second, "reports to arrive", func() bool {
		n, err := admin.Node(ctx, b.ID())
		return err == nil && n.Liveness == ledger.LivenessOnline && n.Used.CPUs == 1
	})
	before, _ := admin.Node(ctx, b.ID())
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	after, _ := admin.Node(ctx, b.ID())
	if !after.LastReport.After(before.LastReport) {
		t.Errorf("no last report on stop: %s, then %s", before.LastReport, after.LastReport)
	}
	if !strings.Contains(status.String(), "registered with site lab") {
		t.Errorf("status:\n%s", status.String())
	}
}

func TestNew_RefusesTmpfs(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("mount tmpfs: %v", err)
	}
	defer unix.Unmount(dir, 0)
	if _, err := New(Config{StateDir: dir, LedgerURL: "http://x", Site: "s"}); !errors.Is(err, ErrTmpfs) {
		t.Errorf("New on tmpfs = %v, want ErrTmpfs", err)
	}
	if _, err := New(Config{StateDir: dir, AllowTmpfs: true, LedgerURL: "http://x", Site: "s"}); err != nil {
		t.Errorf("New on tmpfs, allowed = %v", err)
	}
}

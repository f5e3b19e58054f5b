package identity

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
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

// outage stands in front of a ledger and drops every connection while
// down.
type outage struct {
	mu   sync.Mutex
	down bool
}

func (o *outage) set(down bool) {
	o.mu.Lock()
	o.down = down
	o.mu.Unlock()
}

func (o *outage) front(t *testing.T, target string) string {
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(u)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		o.mu.Lock()
		down := o.down
		o.mu.Unlock()
		if down {
			panic(http.ErrAbortHandler) // the connection drops, as with a dead ledger
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(hs.Close)
	return hs.URL
}

// TestAgent_QueuesThroughOutageAndReboots: while the ledger is away the
// node's reports wait on its state directory, through a restart and two
// reboots; when it is back, they are delivered in order, and the ledger
// counts every boot, the one it never saw live included.
func TestAgent_QueuesThroughOutageAndReboots(t *testing.T) {
	l := testenv.NewLedger(t, ledger.Site{Name: "lab", SupervisorURL: "http://127.0.0.1:1"})
	admin := &ledger.Client{BaseURL: l.URL, Key: l.Admin}
	ctx := context.Background()
	tok, err := admin.CreateToken(ctx, "lab", 0)
	if err != nil {
		t.Fatal(err)
	}
	var o outage
	front := o.front(t, l.URL)
	dir := t.TempDir()
	var status syncBuffer
	// boot runs the agent as if the machine had booted with this boot ID,
	// until stop is called.
	boot := func(id string) (a *Agent, stop func()) {
		t.Helper()
		bootFile := filepath.Join(t.TempDir(), "boot_id")
		if err := os.WriteFile(bootFile, []byte(id+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		a, err := New(Config{StateDir: dir, AllowTmpfs: true, LedgerURL: front, Site: "lab", Token: tok.Secret, Status: &status,
			Interval: 50 * time.Millisecond, BootIDFile: bootFile})
		if err != nil {
			t.Fatal(err)
		}
		runCtx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- a.Run(runCtx) }()
		return a, func() {
			cancel()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		}
	}
	queued := func() []ledger.Uptime {
		t.Helper()
		var list []ledger.Uptime
		b, err := os.ReadFile(filepath.Join(dir, QueueFile))
		if err == nil {
			err = json.Unmarshal(b, &list)
		}
		if err != nil {
			t.Fatal(err)
		}
		return list
	}

	a, stop := boot("boot-1")
	testenv.WaitFor(t, 10*time.Second, "the first boot's reports", func() bool {
		n, err := admin.Node(ctx, a.ID())
		return err == nil && n.BootID == "boot-1"
	})
	o.set(true)
	testenv.WaitFor(t, 10*time.Second, "a report to fail and be queued", func() bool {
		b, err := os.ReadFile(filepath.Join(dir, QueueFile))
		var list []ledger.Uptime
		return err == nil && json.Unmarshal(b, &list) == nil && len(list) == 1 && list[0].Queued
	})
	stop() // a restart: the last report cannot land
	if q := queued(); len(q) != 1 || q[0].BootID != "boot-1" || !q[0].Queued {
		t.Fatalf("queue after the first boot = %+v, want its last report, queued", q)
	}
	_, stop = boot("boot-2") // a boot the ledger never hears of live
	testenv.WaitFor(t, 10*time.Second, "the second boot's report queued", func() bool { return len(queued()) == 2 })
	stop()
	a, stop = boot("boot-3")
	testenv.WaitFor(t, 10*time.Second, "the third boot's report queued", func() bool { return len(queued()) == 3 })
	if n, _ := admin.Node(ctx, a.ID()); n.Boots != 1 {
		t.Fatalf("the ledger counted %d boots during its outage", n.Boots)
	}

	o.set(false)
	testenv.WaitFor(t, 10*time.Second, "the queue delivered", func() bool {
		n, err := admin.Node(ctx, a.ID())
		return err == nil && n.BootID == "boot-3" && len(queued()) == 0
	})
	stop()
	n, err := admin.Node(ctx, a.ID())
	if err != nil || n.Boots != 3 {
		t.Errorf("after the outage the ledger counts %d boots (%v), want 3", n.Boots, err)
	}
}

// TestQueue_Bounds: one report per boot, the newest boots kept, and an
// unreadable file set aside rather than stopping the node.
func TestQueue_Bounds(t *testing.T) {
	dir := t.TempDir()
	q, err := loadQueue(dir)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Now()
	for i := range maxQueued + 10 {
		for j := range 3 {
			at = at.Add(time.Second)
			if err := q.add(ledger.Uptime{BootID: strconv.Itoa(i), UptimeSeconds: int64(j), At: at}); err != nil {
				t.Fatal(err)
			}
		}
	}
	again, err := loadQueue(dir)
	if err != nil {
		t.Fatal(err)
	}
	if again.len() != maxQueued || again.list[0].BootID != "10" || again.list[maxQueued-1].UptimeSeconds != 2 || !again.list[0].Queued {
		t.Errorf("queue = %d reports, first %+v, last %+v", again.len(), again.list[0], again.list[maxQueued-1])
	}
	if err := os.WriteFile(filepath.Join(dir, QueueFile), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	bad, err := loadQueue(dir)
	if bad == nil || err == nil || bad.len() != 0 {
		t.Fatalf("loadQueue of a broken file = %v, %v", bad, err)
	}
	if _, err := os.Stat(filepath.Join(dir, QueueFile+".bad")); err != nil {
		t.Errorf("the broken file was not set aside: %v", err)
	}
}

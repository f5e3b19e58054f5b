package queue

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/writ-fleet/writ/internal/redisproc"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/pki"
)

// TestACL_RolesOverTLS runs a real redis-server with TLS and writ's ACL
// users (the default user off): each role does its work, and each is
// refused what belongs to another; a client without a password, or
// trusting another CA, gets nothing.
func TestACL_RolesOverTLS(t *testing.T) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server not installed (make test installs it)")
	}
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "acl-test-ca")
	if err != nil {
		t.Fatal(err)
	}
	cert, key := filepath.Join(dir, "redis.crt"), filepath.Join(dir, "redis.key")
	if err := ca.IssueFiles(pki.Request{Name: "redis", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}, cert, key); err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(dir, "ca", pki.CACertFile)
	pass := map[string]string{ACLCoord: "pw-coord-0123456789", ACLSupervisor: "pw-sup-0123456789", ACLRunner: "pw-run-0123456789"}
	var users []redisproc.User
	for role, pw := range pass {
		users = append(users, redisproc.User{Name: role, Password: pw, Rules: ACLRules(role, "s")})
	}
	rdir := filepath.Join(dir, "redis")
	os.MkdirAll(rdir, 0o700)
	p, err := redisproc.Start(redisproc.Config{Dir: rdir, Port: testenv.FreePort(t), Users: users, TLS: &redisproc.TLS{Cert: cert, Key: key, CA: caFile}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	conf, _ := os.ReadFile(filepath.Join(rdir, "redis.conf"))
	for _, pw := range pass {
		if strings.Contains(string(conf), pw) {
			t.Errorf("redis.conf holds a password in plain text")
		}
	}
	pool, _ := pki.LoadPool(caFile)
	tc := &tls.Config{RootCAs: pool}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dial := func(user, pw string, tc *tls.Config) *Redis {
		r, err := Dial(p.UserURL(user), Credentials{Password: pw, TLS: tc})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		return r
	}
	coord, sup, run := dial(ACLCoord, pass[ACLCoord], tc), dial(ACLSupervisor, pass[ACLSupervisor], tc), dial(ACLRunner, pass[ACLRunner], tc)
	for name, r := range map[string]*Redis{"coord": coord, "supervisor": sup, "runner": run} {
		if err := r.Ping(ctx); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}

	// Strangers: no password, a wrong one, the default user, plain TCP,
	// another CA.
	other, _ := pki.InitCA(filepath.Join(dir, "other"), "other-ca")
	otherPool := x509Pool(t, other)
	for name, r := range map[string]*Redis{
		"no password":  dial(ACLRunner, "", tc),
		"bad password": dial(ACLRunner, "guess", tc),
		"default user": dial("default", "", tc),
		"another CA":   dial(ACLRunner, pass[ACLRunner], &tls.Config{RootCAs: otherPool}),
	} {
		if err := r.Ping(ctx); err == nil {
			t.Errorf("%s: PING answered", name)
		}
	}
	plain, _ := Connect(strings.Replace(p.UserURL(ACLRunner), "rediss://", "redis://", 1))
	defer plain.Close()
	if err := plain.Ping(ctx); err == nil {
		t.Error("plain TCP to a TLS Redis answered")
	}

	// Each role does its work: the supervisor admits and enqueues, the
	// runner takes the task and publishes, coord records.
	claims := []Claim{{Site: "s", Nonce: "n1", JobID: "j1", Until: time.Now().Add(time.Hour)}}
	if _, err := sup.Admit(ctx, claims); err != nil {
		t.Fatalf("supervisor admits: %v", err)
	}
	if _, err := sup.Enqueue(ctx, Task{ID: "j1", Envelope: []byte("{}"), Queue: SiteQueue("s"), MaxRetry: 1, Timeout: time.Minute}); err != nil {
		t.Fatalf("supervisor enqueues: %v", err)
	}
	if _, err := sup.Enqueue(ctx, Task{ID: "j2", Envelope: []byte("{}"), Queue: NodeQueue("n1"), MaxRetry: 1, Timeout: time.Minute}); err != nil {
		t.Fatalf("supervisor enqueues for a node: %v", err)
	}
	var ran atomic.Int32
	wctx, wcancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- run.Work(wctx, WorkerConfig{Site: "s", Queues: map[string]int{SiteQueue("s"): 1, NodeQueue("n1"): 1}, Concurrency: 2, Log: slog.New(slog.NewTextHandler(io.Discard, nil))},
			func(ctx context.Context, d Delivery) error {
				ran.Add(1)
				return run.Publish(ctx, "s", job.Event{Job: d.ID, Type: job.EventSucceeded, At: time.Now()})
			})
	}()
	testenv.WaitFor(t, 20*time.Second, "the runner to run both tasks", func() bool { return ran.Load() == 2 })
	wcancel()
	if err := <-done; err != nil {
		t.Fatalf("runner: %v", err)
	}
	evs, err := sup.ReadEvents(ctx, "s", "0", 10, 0)
	if err != nil || len(evs) != 2 {
		t.Fatalf("supervisor reads its site's events: %d, %v", len(evs), err)
	}
	if _, err := coord.CreateJobs(ctx, []NewJobRecord{{Job: job.Record{ID: "j1", Site: "s", State: job.StateQueued, SubmittedAt: time.Now()}}}, time.Hour); err != nil {
		t.Fatalf("coord records: %v", err)
	}

	// The supervisor cancels; the runner reads that, and cannot cancel.
	if _, err := sup.CancelJob(ctx, "s", "gone", SiteQueue("s")); err != nil {
		t.Fatalf("supervisor cancels: %v", err)
	}
	if yes, err := run.CancelRequested(ctx, "s", "gone"); err != nil || !yes {
		t.Fatalf("runner reads a cancellation: %v, %v", yes, err)
	}

	// The supervisor keeps a flow; the runner reads it, and cannot write one.
	if err := sup.StoreSiteFlows(ctx, "s", map[string]SiteFlow{"f1": {Envelope: []byte("{}"), Expires: time.Now().Add(time.Hour)}}); err != nil {
		t.Fatalf("supervisor keeps a flow: %v", err)
	}
	if b, err := run.SiteFlowEnvelope(ctx, "s", "f1"); err != nil || string(b) != "{}" {
		t.Fatalf("runner reads a kept flow: %s, %v", b, err)
	}

	// Each is refused the others' keys.
	for name, try := range map[string]func() error{
		"runner keeps a flow": func() error {
			return run.StoreSiteFlows(ctx, "s", map[string]SiteFlow{"f2": {Envelope: []byte("{}"), Expires: time.Now().Add(time.Hour)}})
		},
		"runner cancels":                   func() error { return run.rdb.Set(ctx, cancelKey("s", "x"), "1", time.Minute).Err() },
		"runner claims a nonce":            func() error { _, err := run.Admit(ctx, claims); return err },
		"runner reads coord's records":     func() error { _, err := run.GetJob(ctx, "j1"); return err },
		"runner publishes to another site": func() error { return run.Publish(ctx, "t", job.Event{Job: "x", Type: job.EventSucceeded}) },
		"supervisor writes coord's records": func() error {
			_, err := sup.CreateJobs(ctx, []NewJobRecord{{Job: job.Record{ID: "x", Site: "s", State: job.StateQueued, SubmittedAt: time.Now()}}}, time.Hour)
			return err
		},
		"supervisor enqueues for another site": func() error {
			_, err := sup.Enqueue(ctx, Task{ID: "x", Envelope: []byte("{}"), Queue: SiteQueue("t"), MaxRetry: 1, Timeout: time.Minute})
			return err
		},
		"coord enqueues": func() error {
			_, err := coord.Enqueue(ctx, Task{ID: "x", Envelope: []byte("{}"), Queue: SiteQueue("s"), MaxRetry: 1, Timeout: time.Minute})
			return err
		},
		"coord reads site events": func() error { _, err := coord.ReadEvents(ctx, "s", "0", 10, 0); return err },
		"runner flushes":          func() error { return run.rdb.FlushAll(ctx).Err() },
		"runner reads the ACL":    func() error { return run.rdb.Do(ctx, "ACL", "LIST").Err() },
		"runner reads config":     func() error { return run.rdb.ConfigGet(ctx, "*").Err() },
	} {
		if err := try(); err == nil || !strings.Contains(strings.ToUpper(err.Error()), "NOPERM") {
			t.Errorf("%s: %v, want NOPERM", name, err)
		}
	}
}

func x509Pool(t *testing.T, ca *pki.CA) *x509.CertPool {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	return pool
}

package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
)

// writBin is the writ binary built once for all tests.
var writBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "writ-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Others may search it, so a root runner's sandboxes can run writ as
	// nobody (scripts.SandboxUser).
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	writBin = filepath.Join(dir, "writ")
	args := []string{"build", "-o", writBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "github.com/writ-fleet/writ/cmd/writ")
	if out, err := exec.Command("go", args...).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build writ: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is a writ service process.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  *bytes.Buffer
	done chan struct{}
	mu   *sync.Mutex
}

// fleet is a set of writ processes sharing one Redis and one ledger.
type fleet struct {
	t      *testing.T
	dir    string
	redis  string
	admin  *keys.Key
	ledger string // URL
	coord  string // URL
	procs  map[string]*proc
	ports  map[string]int
	mu     sync.Mutex
	lc     *ledger.Client
}

// newFleet starts Redis and the ledger with an admin and site "local"
// (supervisor port reserved). Start the rest with startSupervisor,
// startCoord and startRunner.
func newFleet(t *testing.T) *fleet {
	t.Helper()
	f := &fleet{t: t, dir: t.TempDir(), redis: testenv.Redis(t), procs: map[string]*proc{}, ports: map[string]int{}}
	var err error
	if f.admin, err = keys.Generate("admin@e2e"); err != nil {
		t.Fatal(err)
	}
	keyPath := filepath.Join(f.dir, "admin.key")
	if err := f.admin.Save(keyPath); err != nil {
		t.Fatal(err)
	}
	f.ports["ledger"] = testenv.FreePort(t)
	f.ports["supervisor:local"] = testenv.FreePort(t)
	f.ports["coord"] = testenv.FreePort(t)
	f.ledger = "http://" + testenv.Addr(f.ports["ledger"])
	f.coord = "http://" + testenv.Addr(f.ports["coord"])
	db := filepath.Join(f.dir, "ledger.db")
	f.run("ledger", "init", "--db", db, "--admin-name", "root", "--admin-key", keyPath+".pub",
		"--site", "local", "--supervisor", "http://"+testenv.Addr(f.ports["supervisor:local"]))
	f.start("ledger", "ledger", "serve", "--db", db, "--listen", testenv.Addr(f.ports["ledger"]))
	f.waitReady(f.ledger)
	f.lc = &ledger.Client{BaseURL: f.ledger, Key: f.admin}
	return f
}

// run runs a writ command to completion and returns its stdout.
func (f *fleet) run(args ...string) string {
	f.t.Helper()
	out, err := exec.Command(writBin, args...).Output()
	if err != nil {
		stderr := ""
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		f.t.Fatalf("writ %s: %v\n%s", strings.Join(args, " "), err, stderr)
	}
	return string(out)
}

// start launches a writ service process named name.
func (f *fleet) start(name string, args ...string) *proc {
	f.t.Helper()
	cmd := exec.Command(writBin, append(args, "--log-level", "debug")...)
	var buf bytes.Buffer
	mu := &sync.Mutex{}
	w := &lockedWriter{mu: mu, b: &buf}
	cmd.Stdout, cmd.Stderr = w, w
	// Die with the test binary, so a crashed test leaves nothing behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.t.Fatal(err)
	}
	p := &proc{name: name, cmd: cmd, log: &buf, done: make(chan struct{}), mu: mu}
	go func() { cmd.Wait(); close(p.done) }()
	f.mu.Lock()
	f.procs[name] = p
	f.mu.Unlock()
	f.t.Cleanup(func() {
		f.stop(p, syscall.SIGTERM)
		if f.t.Failed() {
			mu.Lock()
			f.t.Logf("---- %s log ----\n%s", name, tail(buf.String(), 6000))
			mu.Unlock()
		}
	})
	return p
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// stop signals p and waits for it to exit (SIGKILL after 15 s).
func (f *fleet) stop(p *proc, sig syscall.Signal) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

func (f *fleet) waitReady(base string) {
	f.t.Helper()
	testenv.WaitFor(f.t, 30*time.Second, base+"/readyz", func() bool {
		resp, err := http.Get(base + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// startSupervisor starts the supervisor of site (which must have a port
// reserved as "supervisor:SITE").
func (f *fleet) startSupervisor(site string) *proc {
	port := f.ports["supervisor:"+site]
	p := f.start("supervisor:"+site, "supervisor", "--site", site, "--listen", testenv.Addr(port),
		"--redis", f.redis, "--ledger", f.ledger, "--trust-ttl", "1s")
	f.waitReady("http://" + testenv.Addr(port))
	return p
}

func (f *fleet) startCoord() *proc {
	p := f.start("coord", "coord", "--listen", testenv.Addr(f.ports["coord"]), "--redis", f.redis, "--ledger", f.ledger)
	f.waitReady(f.coord)
	return p
}

func (f *fleet) startRunner(node string, concurrency int) *proc {
	return f.start("runner:"+node, "runner", "--site", "local", "--node", node, "--redis", f.redis,
		"--ledger", f.ledger, "--listen", "", "--concurrency", strconv.Itoa(concurrency), "--trust-ttl", "1s", "--no-network", "--no-vm")
}

// startAll starts the supervisor of site local, coord and one runner.
func (f *fleet) startAll() {
	f.startSupervisor("local")
	f.startCoord()
	f.startRunner("n1", 4)
}

func (f *fleet) client() *coord.Client { return &coord.Client{BaseURL: f.coord} }

// addUser creates a user with a fresh key and roles.
func (f *fleet) addUser(name string, roles map[string]string) *keys.Key {
	f.t.Helper()
	k, _ := keys.Generate(name)
	if _, err := f.lc.CreateUser(context.Background(), ledger.CreateUserRequest{Name: name, Roles: roles, PublicKeys: []string{k.AuthorizedKey()}}); err != nil {
		f.t.Fatal(err)
	}
	return k
}

// waitJob waits for a job to end and returns it.
func (f *fleet) waitJob(id string, timeout time.Duration) *job.Record {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	for {
		j, err := f.client().Job(ctx, id, timeout)
		if err == nil && j.State.Terminal() {
			return j
		}
		if ctx.Err() != nil {
			f.t.Fatalf("job %s did not end within %s (last: %+v, %v)", id, timeout, j, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// events returns a job's events (by watching it to the end).
func (f *fleet) events(id string) []job.Event {
	f.t.Helper()
	var evs []job.Event
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := f.client().Watch(ctx, id, func(ev job.Event) bool { evs = append(evs, ev); return true }); err != nil {
		f.t.Fatalf("watch %s: %v", id, err)
	}
	return evs
}

func count(evs []job.Event, t job.EventType) int {
	n := 0
	for _, e := range evs {
		if e.Type == t {
			n++
		}
	}
	return n
}

// enrollSite sets site local's uptime interval (seconds), starts its
// supervisor and coord, and returns a fresh enrollment token's secret.
func (f *fleet) enrollSite(interval int) string {
	f.t.Helper()
	ctx := context.Background()
	if err := f.lc.PutSite(ctx, ledger.Site{Name: "local", SupervisorURL: "http://" + testenv.Addr(f.ports["supervisor:local"]),
		Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}, UptimeInterval: ledger.Seconds(interval)}); err != nil {
		f.t.Fatal(err)
	}
	f.startSupervisor("local")
	f.startCoord()
	tok, err := f.lc.CreateToken(ctx, "local", 0)
	if err != nil {
		f.t.Fatal(err)
	}
	return tok.Secret
}

// tempPool returns a directory for a storage pool's file and the pool's
// mountpoint inside it. It lives outside the test's temporary directory and
// is unmounted and removed last, after every process using it is gone
// (cleanups run in reverse: register it before starting the fleet).
func tempPool(t *testing.T) (dir, mnt string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "writ-e2e-pool")
	if err != nil {
		t.Fatal(err)
	}
	mnt = filepath.Join(dir, "mnt")
	t.Cleanup(func() {
		unix.Unmount(mnt, 0)
		os.RemoveAll(dir)
	})
	return dir, mnt
}

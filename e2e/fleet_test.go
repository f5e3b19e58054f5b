package e2e

import (
	"bytes"
	"context"
	"fmt"
	assembly "github.com/writ-fleet/writ/internal/fleet"
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
	"github.com/writ-fleet/writ/pki"
)

// writBin is the writ binary built once for all tests.
var writBin string

// tlsDir holds the tests' site CA (ca.crt, $WRIT_CA of every writ process)
// and a certificate per service name (NAME.crt, NAME.key), all valid for
// 127.0.0.1 (and 10.0.2.2, the host as a QEMU guest sees it).
var tlsDir string

// e2eHTTP is the tests' own client: it trusts the CA and shows the "e2e"
// certificate (the ops endpoints need one).
var e2eHTTP *http.Client

// makeCA makes the tests' CA and certificates in dir.
func makeCA(dir string) error {
	ca, err := assembly.OpenCA(dir, "writ-e2e-ca")
	if err != nil {
		return err
	}
	for _, name := range []string{"ledger", "coord", "supervisor", "runner", "e2e"} {
		if _, _, err := ca.Issue(name, "localhost", "127.0.0.1", "10.0.2.2"); err != nil {
			return err
		}
	}
	cfg, err := ca.Config("e2e")
	if err != nil {
		return err
	}
	e2eHTTP = cfg.HTTPClient(0)
	return nil
}

// tlsArgs are the TLS flags of a writ service started with args.
func tlsArgs(args []string) []string {
	if len(args) == 0 {
		return nil
	}
	name := ""
	switch args[0] {
	case "ledger":
		if len(args) > 1 && args[1] == "serve" {
			name = "ledger"
		}
	case "coord", "supervisor":
		name = args[0]
	case "runner", "node":
		name = "runner"
	}
	if name == "" {
		return nil
	}
	return []string{"--tls-cert", filepath.Join(tlsDir, name+".crt"), "--tls-key", filepath.Join(tlsDir, name+".key")}
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "writ-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Others may search it, so a root runner's sandboxes can run writ as
	// nobody (sandbox.User).
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	writBin = filepath.Join(dir, "writ")
	tlsDir = filepath.Join(dir, "tls")
	if err := makeCA(tlsDir); err != nil {
		fmt.Fprintln(os.Stderr, "test CA:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	// Every writ process the tests start trusts the test CA.
	os.Setenv("WRIT_CA", filepath.Join(tlsDir, pki.CACertFile))
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

// slow skips an end-to-end test under -short (make test-short, the inner
// loop): the fast ones (a job through the CLI, writ dev, a network, DSSE
// interop, duplicates) still run there, and make test runs them all.
func slow(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("slow end-to-end test: skipped under -short (make test runs it)")
	}
}

// proc is a writ service process.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  *lockedBuffer // its stdout and stderr
	done chan struct{}
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
	f.ledger = "https://" + testenv.Addr(f.ports["ledger"])
	f.coord = "https://" + testenv.Addr(f.ports["coord"])
	db := filepath.Join(f.dir, "ledger.db")
	f.run("ledger", "init", "--db", db, "--admin-name", "root", "--admin-key", keyPath+".pub",
		"--site", "local", "--supervisor", "https://"+testenv.Addr(f.ports["supervisor:local"]))
	f.start("ledger", "ledger", "serve", "--db", db, "--listen", testenv.Addr(f.ports["ledger"]))
	f.waitReady(f.ledger)
	f.lc = e2eLedger(f.ledger, f.admin)
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
	args = append(args, tlsArgs(args)...)
	return f.startCmd(name, exec.Command(writBin, append(args, "--log-level", "debug")...))
}

// startCmd launches cmd as the service process named name.
func (f *fleet) startCmd(name string, cmd *exec.Cmd) *proc {
	f.t.Helper()
	buf := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = buf, buf
	// Die with the test binary, so a crashed test leaves nothing behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.t.Fatal(err)
	}
	p := &proc{name: name, cmd: cmd, log: buf, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	f.mu.Lock()
	f.procs[name] = p
	f.mu.Unlock()
	f.t.Cleanup(func() {
		f.stop(p, syscall.SIGTERM)
		if f.t.Failed() {
			f.t.Logf("---- %s log ----\n%s", name, tail(buf.String(), 6000))
		}
	})
	return p
}

// lockedBuffer is a bytes.Buffer safe for a process's writes and the
// test's reads at once.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Bytes is a copy of what was written.
func (b *lockedBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.buf.Bytes())
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
		resp, err := e2eHTTP.Get(base + "/readyz")
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
	f.waitReady("https://" + testenv.Addr(port))
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

// registerNode registers a new node of site in the ledger, as writ node
// does, and saves its key in the fleet's directory: the runner given it
// (--node-key) signs the outputs of the flow steps it runs and takes only
// signed inputs. It returns the key's path and the node's ID.
func (f *fleet) registerNode(site string) (string, string) {
	f.t.Helper()
	ctx := context.Background()
	tok, err := f.lc.CreateToken(ctx, site, 0)
	if err != nil {
		f.t.Fatal(err)
	}
	k, _ := keys.Generate("e2e-node")
	pool, err := pki.LoadPool(filepath.Join(tlsDir, pki.CACertFile))
	if err != nil {
		f.t.Fatal(err)
	}
	nc := ledger.NodeClient(f.ledger, k, e2eHTTP)
	nc.Verify = &ledger.TrustVerifier{CA: pool}
	if _, err := nc.Register(ctx, ledger.RegisterRequest{Site: site, Token: tok.Secret, PublicKey: k.AuthorizedKey()}); err != nil {
		f.t.Fatal(err)
	}
	id := ledger.NodeID(k.Public)
	path := filepath.Join(f.dir, "node-"+id+".key")
	if err := k.Save(path); err != nil {
		f.t.Fatal(err)
	}
	return path, id
}

// startAll starts the supervisor of site local, coord and one runner.
func (f *fleet) startAll() {
	f.startSupervisor("local")
	f.startCoord()
	f.startRunner("n1", 4)
}

// client is a coord client signing as the fleet's admin.
func (f *fleet) client() *coord.Client { return f.clientAs(f.admin) }

// clientAs is a coord client signing as k.
func (f *fleet) clientAs(k *keys.Key) *coord.Client {
	return &coord.Client{BaseURL: f.coord, Key: k, HTTP: e2eHTTP}
}

// e2eLedger is a ledger client over TLS that checks trust snapshots.
func e2eLedger(url string, k *keys.Key) *ledger.Client {
	pool, err := pki.LoadPool(filepath.Join(tlsDir, pki.CACertFile))
	if err != nil {
		panic(err)
	}
	return &ledger.Client{BaseURL: url, Key: k, HTTP: e2eHTTP, Verify: &ledger.TrustVerifier{CA: pool}}
}

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
	if err := f.lc.PutSite(ctx, ledger.Site{Name: "local", SupervisorURL: "https://" + testenv.Addr(f.ports["supervisor:local"]),
		Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}, UptimeInterval: ledger.Seconds(interval)}); err != nil {
		f.t.Fatal(err)
	}
	f.startSupervisor("local")
	f.startCoord()
	tok, err := f.lc.CreateTokenFor(ctx, "local", ledger.CreateTokenRequest{Uses: 10})
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

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/writ-fleet/writ/dispatch"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
)

// TestFleet_Nodes: three `writ node` processes (three state directories)
// register with one ledger and report uptime; jobs that need a whole
// node's CPUs land one per node, and a fourth finds no room. Stopping a
// node turns it stale, then offline, and new jobs avoid it.
func TestFleet_Nodes(t *testing.T) {
	slow(t)
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	token := f.enrollSite(1) // report every second: online within 2 s, stale within 5 s
	var nodes []*proc
	for i := 1; i <= 3; i++ {
		nodes = append(nodes, f.start(fmt.Sprintf("node%d", i), "node", "--ledger", f.ledger, "--site", "local", "--token", token,
			"--state-dir", filepath.Join(f.dir, fmt.Sprintf("node%d", i)), "--allow-tmpfs", "--redis", f.redis,
			"--no-network", "--no-vm", "--cpus", "2", "--memory", "1G", "--concurrency", "2", "--trust-ttl", "1s"))
	}
	online := func() map[string]string {
		list, err := f.lc.Nodes(ctx, "local")
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, n := range list {
			out[n.ID] = n.Liveness
		}
		return out
	}
	testenv.WaitFor(t, 30*time.Second, "three nodes online", func() bool {
		n := 0
		for _, l := range online() {
			if l == ledger.LivenessOnline {
				n++
			}
		}
		return n == 3
	})

	submit := func(name string) (string, string) {
		t.Helper()
		j := envelope.NewJob(name, `job := import("job"); times := import("times"); times.sleep(1500 * times.millisecond); job.result(job.node)`, "local", time.Now())
		j.Resources = envelope.Resources{CPU: 2, MemoryMB: 512}
		rep, err := f.client().Submit(ctx, rawEnvelope(t, j, f.admin))
		if err != nil {
			return "", err.Error()
		}
		return rep.ID, ""
	}
	runAll := func(n int) (map[string]int, string) {
		t.Helper()
		var ids []string
		for i := 0; i < n; i++ {
			id, refusal := submit(fmt.Sprintf("big-%d-%d", n, i))
			if refusal != "" {
				if i < n-1 {
					t.Fatalf("job %d of %d refused: %s", i+1, n, refusal)
				}
				return placed(t, f, ids), refusal
			}
			ids = append(ids, id)
		}
		return placed(t, f, ids), ""
	}
	per, refusal := runAll(4)
	if len(per) != 3 || !strings.Contains(refusal, "no_capacity") {
		t.Fatalf("4 jobs of a whole node each on 3 nodes: placed %v, fourth: %q", per, refusal)
	}
	for node, n := range per {
		if n != 1 {
			t.Errorf("node %s ran %d of the jobs, want 1 each", node, n)
		}
	}

	// Stop one node: stale, then offline; new jobs avoid it.
	var gone string
	nodeOf := func(p *proc) string {
		for _, line := range strings.Split(p.log.String(), "\n") {
			if i := strings.Index(line, "writ node n"); i >= 0 {
				return strings.Fields(line[i+len("writ node "):])[0][:21]
			}
		}
		return ""
	}
	gone = nodeOf(nodes[2])
	f.stop(nodes[2], syscall.SIGTERM)
	testenv.WaitFor(t, 15*time.Second, "the stopped node to turn stale", func() bool { return online()[gone] == ledger.LivenessStale })
	testenv.WaitFor(t, 15*time.Second, "the stopped node to turn offline", func() bool { return online()[gone] == ledger.LivenessOffline })
	per, refusal = runAll(3)
	if len(per) != 2 || per[gone] != 0 || !strings.Contains(refusal, "no_capacity") || !strings.Contains(refusal, gone+" is offline") {
		t.Errorf("after stopping %s: placed %v, third: %q", gone, per, refusal)
	}
}

// placed waits for the jobs and counts them per node (from their results).
func placed(t *testing.T, f *fleet, ids []string) map[string]int {
	t.Helper()
	per := map[string]int{}
	for _, id := range ids {
		j := f.waitJob(id, time.Minute)
		if j.State != job.StateSucceeded {
			t.Fatalf("job %s = %s (%s)", id, j.State, j.Error)
		}
		var node string
		json.Unmarshal(j.Result, &node)
		if node != j.Node {
			t.Errorf("job %s ran on %s but was placed on %s", id, node, j.Node)
		}
		per[node]++
	}
	return per
}

// TestFleet_NodeRevoked: a one-use token enrolls one node and refuses a
// second; the enrolled node restarts without a token; once revoked (writ
// node revoke), its reports are refused, its runner stops taking work, and
// the site's jobs run elsewhere.
func TestFleet_NodeRevoked(t *testing.T) {
	slow(t)
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	f.enrollSite(1)
	one, err := f.lc.CreateToken(ctx, "local", 0) // one use
	if err != nil {
		t.Fatal(err)
	}
	node := func(name string, token string) *proc {
		return f.start(name, "node", "--ledger", f.ledger, "--site", "local", "--token", token,
			"--state-dir", filepath.Join(f.dir, name), "--allow-tmpfs", "--redis", f.redis,
			"--no-network", "--no-vm", "--concurrency", "2", "--trust-ttl", "1s")
	}
	a := node("a", one.Secret)
	idOf := func(p *proc) string { return registeredID(t, p) }
	aID := idOf(a)
	b := node("b", one.Secret)
	testenv.WaitFor(t, 30*time.Second, "the second node to be refused the used-up token", func() bool {
		return strings.Contains(b.log.String(), "used up")
	})
	f.stop(b, syscall.SIGTERM)
	// a restarts: registered already, it needs no token.
	f.stop(a, syscall.SIGTERM)
	a = f.start("a-again", "node", "--ledger", f.ledger, "--site", "local",
		"--state-dir", filepath.Join(f.dir, "a"), "--allow-tmpfs", "--redis", f.redis,
		"--no-network", "--no-vm", "--concurrency", "2", "--trust-ttl", "1s")
	if id := idOf(a); id != aID {
		t.Fatalf("the restarted node is %s, want %s", id, aID)
	}
	f.startRunner("other", 2)
	j := envelope.NewJob("before", `job := import("job"); job.result(job.node)`, "local", time.Now())
	j.Node = aID
	rep, err := f.client().Submit(ctx, rawEnvelope(t, j, f.admin))
	if err != nil {
		t.Fatal(err)
	}
	if got := f.waitJob(rep.ID, 30*time.Second); got.State != job.StateSucceeded {
		t.Fatalf("a job pinned to the node before revocation = %+v", got)
	}

	out := f.run("node", "revoke", aID, "--ledger", f.ledger, "--key", filepath.Join(f.dir, "admin.key"))
	if !strings.Contains(out, "revoked") {
		t.Errorf("writ node revoke said %q", out)
	}
	nk, err := keys.Load(filepath.Join(f.dir, "a", "node.key"))
	if err == nil {
		if _, err := ledger.NodeClient(f.ledger, nk, e2eHTTP).ReportUptime(ctx, aID, ledger.Uptime{BootID: "x", At: time.Now()}); err == nil || !strings.Contains(err.Error(), "revoked") {
			t.Errorf("a revoked node's report = %v, want refused", err)
		}
	}
	if n, err := f.lc.Node(ctx, aID); err != nil || n.Liveness != ledger.LivenessRevoked {
		t.Errorf("revoked node = %+v, %v", n, err)
	}
	// The revoked node's runner stops within the trust TTL (1 s here);
	// site jobs keep running on the other runner.
	select {
	case <-a.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("the revoked node's process is still running")
	}
	if log := a.log.String(); !strings.Contains(log, "revoked") {
		t.Errorf("the revoked node did not say why it stopped:\n%s", tail(log, 2000))
	}
	for i := range 6 {
		j := envelope.NewJob(fmt.Sprintf("after-%d", i), `job := import("job"); job.result(job.node)`, "local", time.Now())
		rep, err := f.client().Submit(ctx, rawEnvelope(t, j, f.admin))
		if err != nil {
			t.Fatal(err)
		}
		got := f.waitJob(rep.ID, 60*time.Second)
		var ran string
		json.Unmarshal(got.Result, &ran)
		if got.State != job.StateSucceeded || ran == aID {
			t.Errorf("job after revocation = %s on %q", got.State, ran)
		}
	}
}

// TestFleet_Dispatch: a dispatched site (writ supervisor --dispatch): two
// nodes with no Redis credential take work over their signed streams; a
// job pinned to one node runs there only, site jobs run on either, and a
// key the ledger does not know gets nothing. A revoked node's stream is
// cut and its pinned jobs reach no other node.
func TestFleet_Dispatch(t *testing.T) {
	slow(t)
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	supURL, node := dispatchedSite(t, f, 2)
	a, b := node("a", 2), node("b", 2)
	ids := map[string]string{"a": registeredID(t, a), "b": registeredID(t, b)}
	run := func(name, node string) string {
		t.Helper()
		j := envelope.NewJob(name, `job := import("job"); job.result(job.node)`, "local", time.Now())
		j.Node = node
		rep, err := f.client().Submit(ctx, rawEnvelope(t, j, f.admin))
		if err != nil {
			t.Fatal(err)
		}
		got := f.waitJob(rep.ID, 60*time.Second)
		var ran string
		json.Unmarshal(got.Result, &ran)
		if got.State != job.StateSucceeded {
			t.Fatalf("job %s = %+v", name, got)
		}
		return ran
	}
	for i := range 4 {
		if ran := run(fmt.Sprintf("pin-a-%d", i), ids["a"]); ran != ids["a"] {
			t.Errorf("a job pinned to a ran on %s", ran)
		}
		if ran := run(fmt.Sprintf("pin-b-%d", i), ids["b"]); ran != ids["b"] {
			t.Errorf("a job pinned to b ran on %s", ran)
		}
		if ran := run(fmt.Sprintf("site-%d", i), ""); ran != ids["a"] && ran != ids["b"] {
			t.Errorf("a site job ran on %q", ran)
		}
	}
	// A key the ledger does not know: the dispatcher refuses its stream.
	stranger, _ := keys.Generate("stranger")
	sc := &dispatch.Client{BaseURL: supURL, Key: stranger, NodeID: ledger.NodeID(stranger.Public), HTTP: e2eHTTP}
	if err := sc.Ping(ctx); err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("a stranger's node key = %v, want 401", err)
	}
	// Posing as node a with another key: the signature does not verify.
	pose := &dispatch.Client{BaseURL: supURL, Key: stranger, NodeID: ids["a"], HTTP: e2eHTTP}
	if err := pose.Ping(ctx); err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("posing as node a = %v, want 401", err)
	}

	// Revoke b: its runner stops, its stream is cut; site jobs run on a.
	f.run("node", "revoke", ids["b"], "--ledger", f.ledger, "--key", filepath.Join(f.dir, "admin.key"))
	select {
	case <-b.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the revoked node is still running")
	}
	for i := range 3 {
		if ran := run(fmt.Sprintf("after-%d", i), ""); ran != ids["a"] {
			t.Errorf("a site job after b's revocation ran on %s", ran)
		}
	}
}

// TestFleet_DispatchNodeKilled: kill -9 of a dispatched node mid-job: the
// job runs again on the other node (after the dispatcher's grace) and
// succeeds.
func TestFleet_DispatchNodeKilled(t *testing.T) {
	slow(t)
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	_, node := dispatchedSite(t, f, 2)
	a := node("a", 1)
	testenv.WaitFor(t, 30*time.Second, "node a online", func() bool {
		list, _ := f.lc.Nodes(ctx, "local")
		return len(list) == 1
	})
	j := envelope.NewJob("long", `job := import("job"); times := import("times"); if job.attempt == 1 { times.sleep(60 * times.second) }; job.result({node: job.node, attempt: job.attempt})`, "local", time.Now())
	rep, err := f.client().Submit(ctx, rawEnvelope(t, j, f.admin))
	if err != nil {
		t.Fatal(err)
	}
	waitState(t, f, rep.ID, job.StateRunning)
	node("b", 1)
	a.cmd.Process.Kill()
	got := f.waitJob(rep.ID, 90*time.Second)
	if got.State != job.StateSucceeded || got.Attempts < 2 {
		t.Fatalf("the job after its node was killed = %+v", got)
	}
	var res struct {
		Node    string `json:"node"`
		Attempt int    `json:"attempt"`
	}
	json.Unmarshal(got.Result, &res)
	t.Logf("ran again as attempt %d on %s", res.Attempt, res.Node)
}

// TestFleet_DispatchSupervisorKilled: kill -9 of a dispatched site's
// supervisor while a node runs a job, with jobs waiting and more submitted
// while it is down. A new supervisor takes over the site queue, the node
// reconnects, and every job succeeds (the one in flight runs again once
// asynq's lease on it lapses: at least once).
func TestFleet_DispatchSupervisorKilled(t *testing.T) {
	slow(t)
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	_, node := dispatchedSite(t, f, 1)
	registeredID(t, node("a", 2)) // registered: the ledger lists it
	submit := func(name, script string) string {
		t.Helper()
		j := envelope.NewJob(name, script, "local", time.Now())
		j.MaxRetries = 5
		rep, err := f.client().Submit(ctx, rawEnvelope(t, j, f.admin))
		if err != nil {
			t.Fatal(err)
		}
		return rep.ID
	}
	quick := `job := import("job"); job.result({n: job.args.n, attempt: job.attempt})`
	long := submit("long", `job := import("job"); times := import("times"); times.sleep(3 * times.second); job.result("long")`)
	var ids []string
	for i := 0; i < 20; i++ {
		ids = append(ids, submit(fmt.Sprintf("before-%d", i), quick))
	}
	waitState(t, f, long, job.StateRunning)

	f.mu.Lock()
	sup := f.procs["supervisor:local"]
	f.mu.Unlock()
	sup.cmd.Process.Kill()
	<-sup.done
	for i := 0; i < 10; i++ {
		ids = append(ids, submit(fmt.Sprintf("during-%d", i), quick))
	}
	time.Sleep(time.Second)
	port := f.ports["supervisor:local"]
	f.start("supervisor:local", "supervisor", "--site", "local", "--listen", testenv.Addr(port),
		"--redis", f.redis, "--ledger", f.ledger, "--trust-ttl", "1s", "--dispatch")
	f.waitReady("https://" + testenv.Addr(port))

	for _, id := range append(ids, long) {
		// asynq recovers the task whose lease lapsed with its dispatcher:
		// a 30 s lease, a recoverer that runs each minute and allows 30 s
		// of clock skew, so up to two minutes.
		got := f.waitJob(id, 150*time.Second)
		if got.State != job.StateSucceeded {
			t.Errorf("job %s (%s) = %s %s (%s)", id, got.Name, got.State, got.Reason, got.Error)
		}
		if id == long {
			// Its first run's end went to a supervisor that was gone:
			// it succeeded on the task asynq recovered.
			t.Logf("the job in flight succeeded in attempt %d", got.Attempts)
			if got.Attempts < 2 {
				t.Errorf("the job in flight succeeded in attempt %d: the kill did not catch it running", got.Attempts)
			}
		}
	}
}

// dispatchedSite starts site local's supervisor with --dispatch and coord,
// and returns the supervisor's URL and a func starting a node (with no
// Redis: its work comes from the dispatcher) enrolled with a token of
// uses uses.
func dispatchedSite(t *testing.T, f *fleet, uses int64) (string, func(name string, concurrency int) *proc) {
	t.Helper()
	port := f.ports["supervisor:local"]
	f.start("supervisor:local", "supervisor", "--site", "local", "--listen", testenv.Addr(port),
		"--redis", f.redis, "--ledger", f.ledger, "--trust-ttl", "1s", "--dispatch")
	supURL := "https://" + testenv.Addr(port)
	f.waitReady(supURL)
	f.startCoord()
	tok, err := f.lc.CreateTokenFor(context.Background(), "local", ledger.CreateTokenRequest{Uses: uses})
	if err != nil {
		t.Fatal(err)
	}
	return supURL, func(name string, concurrency int) *proc {
		return f.start(name, "node", "--ledger", f.ledger, "--site", "local", "--token", tok.Secret,
			"--state-dir", filepath.Join(f.dir, name), "--allow-tmpfs", "--supervisor", supURL,
			"--no-network", "--no-vm", "--concurrency", strconv.Itoa(concurrency), "--trust-ttl", "1s")
	}
}

// registeredID waits for a writ node process to say it registered, and
// returns its node ID.
func registeredID(t *testing.T, p *proc) string {
	t.Helper()
	var id string
	testenv.WaitFor(t, 30*time.Second, p.name+" to register", func() bool {
		for _, line := range strings.Split(p.log.String(), "\n") {
			if i := strings.Index(line, "registered with site local as "); i >= 0 {
				id = strings.Fields(line[i+len("registered with site local as "):])[0]
				return true
			}
		}
		return false
	})
	return id
}

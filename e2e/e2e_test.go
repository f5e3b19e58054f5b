package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
)

// TestFleet_RunCLI runs a script with `writ run` and gets its result back
// through coord.
func TestFleet_RunCLI(t *testing.T) {
	t.Parallel()
	f := newFleet(t)
	f.startAll()
	out, err := exec.Command(writBin, "run", "../scripts/lib/hello.tengo", "--arg", "who=e2e",
		"--coord", f.coord, "--key", filepath.Join(f.dir, "admin.key"), "--site", "local").Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("writ run: %v\n%s", err, stderr)
	}
	var res struct {
		Greeting string `json:"greeting"`
		Node     string `json:"node"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("result %q: %v", out, err)
	}
	if res.Greeting != "hello, e2e" || res.Node != "n1" {
		t.Errorf("result = %+v", res)
	}
	// A failing script makes writ run exit 1 with the reason.
	bad := filepath.Join(f.dir, "bad.tengo")
	os.WriteFile(bad, []byte(`x := 1; y := x.nope()`), 0o644)
	cmd := exec.Command(writBin, "run", bad, "--coord", f.coord, "--key", filepath.Join(f.dir, "admin.key"), "--site", "local")
	combined, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(combined), "script_error") {
		t.Errorf("writ run of a failing script = %v\n%s", err, combined)
	}
}

// TestFleet_Burst: two runners on one site share a burst of 200 jobs and
// every job runs exactly once.
func TestFleet_Burst(t *testing.T) {
	slow(t)
	t.Parallel()
	f := newFleet(t)
	f.startSupervisor("local")
	f.startCoord()
	f.startRunner("n1", 8)
	f.startRunner("n2", 8)
	cl := f.client()
	script := `job := import("job"); times := import("times"); times.sleep(5 * times.millisecond); job.result(job.args.i)`
	const n = 200
	ids := make([]string, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 32)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			j := envelope.NewJob(fmt.Sprintf("burst-%d", i), script, "local", time.Now())
			j.Args = json.RawMessage(fmt.Sprintf(`{"i":%d}`, i))
			env, _ := j.Sign(f.admin)
			raw, _ := json.Marshal(env)
			rep, err := cl.Submit(context.Background(), raw)
			if err != nil {
				errs <- err
				return
			}
			ids[i] = rep.ID
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	nodes := map[string]int{}
	for i, id := range ids {
		j := f.waitJob(id, 60*time.Second)
		if j.State != job.StateSucceeded || string(j.Result) != fmt.Sprint(i) {
			t.Fatalf("job %d = %s result %s (%s)", i, j.State, j.Result, j.Error)
		}
		nodes[j.Node]++
	}
	// Exactly once: every job has one started event and one succeeded.
	for _, id := range ids {
		evs := f.events(id)
		if s, ok := count(evs, job.EventStarted), count(evs, job.EventSucceeded); s != 1 || ok != 1 {
			t.Errorf("job %s: %d started, %d succeeded events, want 1 and 1", id, s, ok)
		}
	}
	if nodes["n1"] == 0 || nodes["n2"] == 0 {
		t.Errorf("jobs per node = %v, want both runners used", nodes)
	}
	t.Logf("jobs per node: %v", nodes)
}

// rawEnvelope signs an arbitrary job payload, bypassing client-side checks.
func rawEnvelope(t *testing.T, j *envelope.Job, ks ...*keys.Key) []byte {
	t.Helper()
	payload, err := json.Marshal(j)
	if err != nil {
		t.Fatal(err)
	}
	env := envelope.New(envelope.PayloadType, payload)
	for _, k := range ks {
		env.Sign(k.ID, k.Private)
	}
	raw, _ := json.Marshal(env)
	return raw
}

// TestFleet_Rejections: every bad submission is refused before anything
// runs, with a reason that names the problem, and the refusal is visible
// as the job's state.
func TestFleet_Rejections(t *testing.T) {
	slow(t)
	t.Parallel()
	f := newFleet(t)
	ctx := context.Background()
	// A 2-of-3 site with its own supervisor.
	f.ports["supervisor:multi"] = freePort(t)
	if err := f.lc.PutSite(ctx, ledger.Site{Name: "multi", SupervisorURL: "https://127.0.0.1:" + fmt.Sprint(f.ports["supervisor:multi"]), Policy: ledger.Policy{Roles: []string{"deployer"}, Threshold: 2}}); err != nil {
		t.Fatal(err)
	}
	a := f.addUser("a", map[string]string{"multi": "deployer", "local": "deployer"})
	b := f.addUser("b", map[string]string{"multi": "deployer"})
	f.addUser("c", map[string]string{"multi": "deployer"})
	revoked := f.addUser("r", map[string]string{"local": "deployer"})
	f.startAll()
	f.startSupervisor("multi")
	stranger, _ := keys.Generate("stranger")
	now := time.Now()
	mkJob := func(mut func(*envelope.Job)) *envelope.Job {
		j := envelope.NewJob("t", `job := import("job"); job.result("ran")`, "local", now)
		if mut != nil {
			mut(j)
		}
		return j
	}
	// The revoked key works first, then is revoked.
	okRev := rawEnvelope(t, mkJob(nil), revoked)
	if rep, err := f.client().Submit(ctx, okRev); err != nil {
		t.Fatalf("submit by key before revocation: %v", err)
	} else if j := f.waitJob(rep.ID, 30*time.Second); j.State != job.StateSucceeded {
		t.Fatalf("job before revocation: %+v", j)
	}
	if err := f.lc.RevokeKey(ctx, revoked.ID); err != nil {
		t.Fatal(err)
	}
	// The supervisor's --trust-ttl is 1s: once its snapshot is renewed, a
	// job signed by the revoked key is refused.
	testenv.WaitFor(t, 10*time.Second, "the revocation to reach the supervisor", func() bool {
		_, err := f.client().Submit(ctx, rawEnvelope(t, mkJob(nil), revoked))
		var re *coord.RejectedError
		return errors.As(err, &re) && re.Reply.Reason == job.ReasonRevokedKey
	})

	replayed := mkJob(nil)
	if _, err := f.client().Submit(ctx, rawEnvelope(t, replayed, f.admin)); err != nil {
		t.Fatal(err)
	}
	replay := *replayed
	replay.Name = "same nonce, different job"

	tampered := func() []byte {
		var env map[string]any
		json.Unmarshal(rawEnvelope(t, mkJob(nil), f.admin), &env)
		sigs := env["signatures"].([]any)
		s := sigs[0].(map[string]any)
		sig := []byte(s["sig"].(string))
		if sig[0] == 'A' {
			sig[0] = 'B'
		} else {
			sig[0] = 'A'
		}
		s["sig"] = string(sig)
		raw, _ := json.Marshal(env)
		return raw
	}()
	multi := func(ks ...*keys.Key) []byte {
		return rawEnvelope(t, mkJob(func(j *envelope.Job) { j.Site = "multi" }), ks...)
	}
	for _, tc := range []struct {
		name   string
		raw    []byte
		reason job.Reason
		msg    string
		noID   bool
	}{
		{"bad signature", tampered, job.ReasonBadSignature, "does not verify", false},
		{"unknown key", rawEnvelope(t, mkJob(nil), stranger), job.ReasonUnknownKey, "not registered", false},
		{"revoked key", rawEnvelope(t, mkJob(nil), revoked), job.ReasonRevokedKey, "revoked", false},
		{"expired", rawEnvelope(t, mkJob(func(j *envelope.Job) {
			j.NotBefore, j.Expires = now.Add(-2*time.Hour), now.Add(-time.Hour)
		}), f.admin), job.ReasonExpired, "expired at", false},
		{"not yet valid", rawEnvelope(t, mkJob(func(j *envelope.Job) {
			j.NotBefore, j.Expires = now.Add(time.Hour), now.Add(2*time.Hour)
		}), f.admin), job.ReasonNotYetValid, "not valid before", false},
		{"replayed nonce", rawEnvelope(t, &replay, f.admin), job.ReasonReplayed, "already used", false},
		{"wrong site", rawEnvelope(t, mkJob(func(j *envelope.Job) { j.Site = "elsewhere" }), f.admin), job.ReasonWrongSite, "not registered", false},
		{"below threshold", multi(a), job.ReasonBelowThreshold, "requires signatures from 2 distinct users; got 1", false},
		{"does not compile", rawEnvelope(t, mkJob(func(j *envelope.Job) { j.Script = "x := (" }), f.admin), job.ReasonScriptInvalid, "does not compile", false},
		{"forbidden import", rawEnvelope(t, mkJob(func(j *envelope.Job) { j.Script = `os := import("os"); os.exit(1)` }), f.admin), job.ReasonForbiddenImport, `"os"`, false},
		{"oversized script", rawEnvelope(t, mkJob(func(j *envelope.Job) { j.Script = "x := 1\n" + strings.Repeat("// pad\n", envelope.MaxScriptBytes/7+1) }), f.admin), job.ReasonTooLarge, "script is", false},
		{"oversized args", rawEnvelope(t, mkJob(func(j *envelope.Job) {
			j.Args = json.RawMessage(`{"a":"` + strings.Repeat("x", envelope.MaxArgsBytes) + `"}`)
		}), f.admin), job.ReasonTooLarge, "args are", false},
		{"malformed JSON", []byte(`{"payloadType": "application/vnd.writ.job.v1+json", "payload": `), job.ReasonMalformed, "not valid DSSE JSON", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := f.client().Submit(ctx, tc.raw)
			var re *coord.RejectedError
			if !errors.As(err, &re) {
				t.Fatalf("Submit = %v, want a rejection", err)
			}
			if re.Reply.Reason != tc.reason || !strings.Contains(re.Reply.Error, tc.msg) {
				t.Fatalf("rejection = %s: %s; want %s mentioning %q", re.Reply.Reason, re.Reply.Error, tc.reason, tc.msg)
			}
			if tc.noID {
				return
			}
			if re.Reply.ID == "" {
				t.Fatal("rejection carries no job id")
			}
			// coord keeps a record only of a job whose signatures verified:
			// what the supervisor refused (a script that does not compile,
			// a replay) has one; what coord refused before its signatures
			// counted is answered and forgotten.
			j, err := f.client().Job(ctx, re.Reply.ID, 0)
			if err != nil && strings.Contains(err.Error(), "404") && tc.reason != job.ReasonScriptInvalid {
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if j.State != job.StateRejected || j.Reason != tc.reason || j.StartedAt != nil {
				t.Errorf("job state = %s reason %s started %v; want rejected %s, never started", j.State, j.Reason, j.StartedAt, tc.reason)
			}
		})
	}
	// Two of three signers pass the same site's policy.
	rep, err := f.client().Submit(ctx, multi(a, b))
	if err != nil || rep.State != "queued" {
		t.Errorf("2-of-3 submission = %+v, %v; want queued", rep, err)
	}
	// A malformed body gets a clear 400 from the API (once the request
	// is signed: unsigned, it gets 401).
	resp, err := e2eHTTP.Post(f.coord+"/v1/jobs", "application/json", strings.NewReader("not json"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("unsigned POST = HTTP %d, want 401", resp.StatusCode)
	}
	if _, err := f.client().Submit(ctx, []byte("not json")); err == nil || !strings.Contains(err.Error(), "malformed") {
		t.Errorf("signed POST of garbage = %v, want malformed", err)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	return testenv.FreePort(t)
}

// TestFleet_Limits: a script that loops forever is stopped at its deadline,
// one that allocates without end by the allocation cap, and the runner
// takes the next job.
func TestFleet_Limits(t *testing.T) {
	slow(t)
	t.Parallel()
	f := newFleet(t)
	f.startAll()
	ctx := context.Background()
	submit := func(script string, timeout time.Duration) *job.Record {
		j := envelope.NewJob("limits", script, "local", time.Now())
		j.Timeout = envelope.Duration(timeout)
		env, _ := j.Sign(f.admin)
		raw, _ := json.Marshal(env)
		rep, err := f.client().Submit(ctx, raw)
		if err != nil {
			t.Fatal(err)
		}
		return f.waitJob(rep.ID, 60*time.Second)
	}
	if j := submit(`for {}`, 2*time.Second); j.State != job.StateFailed || j.Reason != "timeout" || j.Attempts != 1 {
		t.Errorf("infinite loop: %s %s %q attempts %d, want failed timeout after 1 attempt", j.State, j.Reason, j.Error, j.Attempts)
	}
	// Which cap a growing array meets first depends on the build: the
	// race detector makes every object larger.
	if j := submit(`a := []; for { a = append(a, [1, 2, 3]) }`, time.Minute); j.State != job.StateFailed || (j.Reason != "alloc_limit" && j.Reason != "memory_limit") {
		t.Errorf("unbounded allocation: %s %s %q, want failed alloc_limit or memory_limit", j.State, j.Reason, j.Error)
	}
	if j := submit(`job := import("job"); job.result("still alive")`, time.Minute); j.State != job.StateSucceeded || string(j.Result) != `"still alive"` {
		t.Errorf("job after the limits: %+v", j)
	}
}

// TestFleet_Duplicate: the same envelope submitted twice runs once, also
// when the second submission comes after the job finished.
func TestFleet_Duplicate(t *testing.T) {
	t.Parallel()
	f := newFleet(t)
	f.startAll()
	ctx := context.Background()
	raw := rawEnvelope(t, envelope.NewJob("dup", `job := import("job"); job.result(job.attempt)`, "local", time.Now()), f.admin)
	r1, err := f.client().Submit(ctx, raw)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := f.client().Submit(ctx, raw)
	if err != nil || r2.ID != r1.ID {
		t.Fatalf("second submit = %+v, %v", r2, err)
	}
	f.waitJob(r1.ID, 30*time.Second)
	r3, err := f.client().Submit(ctx, raw)
	if err != nil || r3.State != "duplicate" {
		t.Errorf("submit after the job ended = %+v, %v; want duplicate", r3, err)
	}
	time.Sleep(500 * time.Millisecond)
	if evs := f.events(r1.ID); count(evs, job.EventStarted) != 1 {
		t.Errorf("job started %d times, want 1", count(evs, job.EventStarted))
	}
}

// TestFleet_RunnerKilled: SIGKILL of the runner in the middle of a job does
// not lose it: it runs again when a runner comes back.
func TestFleet_RunnerKilled(t *testing.T) {
	slow(t)
	if testing.Short() {
		t.Skip("waits for asynq's lease recovery (about a minute); skipped with -short")
	}
	t.Parallel()
	f := newFleet(t)
	f.startSupervisor("local")
	f.startCoord()
	r := f.startRunner("n1", 2)
	ctx := context.Background()
	j := envelope.NewJob("slow", `job := import("job"); times := import("times"); if job.attempt == 1 { times.sleep(20 * times.second) }; job.result(job.attempt)`, "local", time.Now())
	env, _ := j.Sign(f.admin)
	raw, _ := json.Marshal(env)
	rep, err := f.client().Submit(ctx, raw)
	if err != nil {
		t.Fatal(err)
	}
	// A job with no retries left cannot run again; it must be reported.
	noRetry := envelope.NewJob("slow-once", `times := import("times"); times.sleep(20 * times.second)`, "local", time.Now())
	noRetry.MaxRetries = 0
	rep0, err := f.client().Submit(ctx, rawEnvelope(t, noRetry, f.admin))
	if err != nil {
		t.Fatal(err)
	}
	waitState(t, f, rep.ID, job.StateRunning)
	waitState(t, f, rep0.ID, job.StateRunning)
	f.stop(r, syscall.SIGKILL)
	f.startRunner("n1b", 2)
	// asynq hands a task whose worker died to another one once its lease
	// (30 s) and a clock-skew margin (30 s) have passed.
	got := f.waitJob(rep.ID, 3*time.Minute)
	if got.State != job.StateSucceeded || got.Node != "n1b" || string(got.Result) != "2" {
		t.Errorf("job after runner kill = %s on %s result %s (%s), want succeeded on n1b in attempt 2", got.State, got.Node, got.Result, got.Error)
	}
	got0 := f.waitJob(rep0.ID, 2*time.Minute)
	if got0.State != job.StateFailed || got0.Reason != "runner_lost" {
		t.Errorf("job without retries after runner kill = %s %s (%s), want failed runner_lost", got0.State, got0.Reason, got0.Error)
	}
}

func waitState(t *testing.T, f *fleet, id string, s job.State) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if j, err := f.client().Job(context.Background(), id, 0); err == nil && j.State == s {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("job %s never reached %s", id, s)
}

// TestFleet_CoordRestart: killing coord loses no job state, and jobs that
// finish while it is down are up to date once it is back.
func TestFleet_CoordRestart(t *testing.T) {
	slow(t)
	t.Parallel()
	f := newFleet(t)
	f.startSupervisor("local")
	c := f.startCoord()
	f.startRunner("n1", 4)
	ctx := context.Background()
	submit := func(script string) string {
		raw := rawEnvelope(t, envelope.NewJob("restart", script, "local", time.Now()), f.admin)
		rep, err := f.client().Submit(ctx, raw)
		if err != nil {
			t.Fatal(err)
		}
		return rep.ID
	}
	done := submit(`job := import("job"); job.result("before")`)
	f.waitJob(done, 30*time.Second)
	slow := submit(`job := import("job"); times := import("times"); times.sleep(2 * times.second); job.result("during")`)
	waitState(t, f, slow, job.StateRunning)
	f.stop(c, syscall.SIGKILL)
	// The slow job finishes while coord is down: its end is on the site's
	// stream, which coord has not read.
	site, err := queue.Connect(f.redis)
	if err != nil {
		t.Fatal(err)
	}
	defer site.Close()
	testenv.WaitFor(t, 30*time.Second, "the slow job to finish while coord is down", func() bool {
		evs, _ := site.ReadEvents(ctx, "local", "0", 10000, 0)
		for _, ev := range evs {
			if ev.Job == slow && ev.Type == job.EventSucceeded {
				return true
			}
		}
		return false
	})
	f.startCoord()
	if j := f.waitJob(done, 10*time.Second); j.State != job.StateSucceeded || string(j.Result) != `"before"` {
		t.Errorf("job finished before the restart: %+v", j)
	}
	if j := f.waitJob(slow, 30*time.Second); j.State != job.StateSucceeded || string(j.Result) != `"during"` {
		t.Errorf("job finished during the restart: %+v", j)
	}
	list, err := f.client().Jobs(ctx, queue.ListFilter{Site: "local"})
	if err != nil || len(list.Jobs) != 2 {
		t.Errorf("job list after restart = %d jobs, %v; want 2", len(list.Jobs), err)
	}
}

// TestFleet_SupervisorDown: a job submitted while its supervisor is down is
// kept pending and delivered when the supervisor comes back.
func TestFleet_SupervisorDown(t *testing.T) {
	slow(t)
	t.Parallel()
	f := newFleet(t)
	f.startCoord()
	f.startRunner("n1", 2)
	ctx := context.Background()
	raw := rawEnvelope(t, envelope.NewJob("later", `job := import("job"); job.result("delivered")`, "local", time.Now()), f.admin)
	rep, err := f.client().Submit(ctx, raw)
	if err != nil || rep.State != "pending" {
		t.Fatalf("submit with the supervisor down = %+v, %v; want pending", rep, err)
	}
	f.startSupervisor("local")
	if j := f.waitJob(rep.ID, 60*time.Second); j.State != job.StateSucceeded || string(j.Result) != `"delivered"` {
		t.Errorf("job after the supervisor came back: %+v", j)
	}
}

// TestDev_Sample runs `writ dev` as `make dev` does, with the sample job,
// on its own data directory and ports, and its own redis-server child.
func TestDev_Sample(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cmd := exec.Command(writBin, "dev", "--dir", filepath.Join(dir, "dev"), "--base-port", "0",
		"--sample", "../scripts/lib/hello.tengo", "--exit-after-sample")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("writ dev: %v\n%s", err, out)
	}
	for _, want := range []string{"writ dev fleet is up", `"greeting": "hello, writ dev"`, "succeeded"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("writ dev output lacks %q:\n%s", want, out)
		}
	}
	env, err := os.ReadFile(filepath.Join(dir, "dev", "env"))
	if err != nil || !strings.Contains(string(env), "WRIT_COORD=") || !strings.Contains(string(env), "WRIT_KEY=") {
		t.Errorf("env file = %q, %v", env, err)
	}
}

// TestFleet_StorageScript: a signed script submitted with writ run creates
// a volume, writes into it through the storage module, snapshots it and
// reports usage, on a real btrfs pool.
func TestFleet_StorageScript(t *testing.T) {
	slow(t)
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, "mkfs.btrfs")
	t.Parallel()
	f := newFleet(t)
	f.startSupervisor("local")
	f.startCoord()
	f.start("runner:pool", "runner", "--no-network", "--no-vm", "--site", "local", "--node", "p1", "--redis", f.redis, "--ledger", f.ledger,
		"--listen", "", "--pool-file", filepath.Join(f.dir, "pool.img"), "--pool-size", "1G", "--pool-mount", filepath.Join(f.dir, "pool"), "--image-allow", "127.0.0.1/32")
	run := func(args ...string) []byte {
		cmd := exec.Command(writBin, append([]string{"run", "../scripts/lib/volume.tengo", "--coord", f.coord,
			"--key", filepath.Join(f.dir, "admin.key"), "--site", "local"}, args...)...)
		out, err := cmd.Output()
		if err != nil {
			var stderr string
			if ee, ok := err.(*exec.ExitError); ok {
				stderr = string(ee.Stderr)
			}
			t.Fatalf("writ run volume.tengo %v: %v\n%s", args, err, stderr)
		}
		return out
	}
	var res struct {
		Volume    string   `json:"volume"`
		Limit     int64    `json:"limit"`
		Used      int64    `json:"used"`
		ReadBack  string   `json:"read_back"`
		Snapshots []string `json:"snapshots"`
		Pool      struct {
			Total int64 `json:"total"`
			Free  int64 `json:"free"`
		} `json:"pool"`
	}
	for i := 0; i < 2; i++ { // the second run converges
		out := run("--arg", "name=data", "--arg", "size=64M", "--arg", "content=stored by writ")
		if err := json.Unmarshal(out, &res); err != nil {
			t.Fatalf("result %s: %v", out, err)
		}
		if res.Volume != "data" || res.Limit != 64<<20 || res.ReadBack != "stored by writ" || len(res.Snapshots) != 1 || res.Pool.Total == 0 || res.Used == 0 {
			t.Errorf("run %d: result = %+v", i+1, res)
		}
	}
	// Ten concurrent jobs ask for the same image: it is downloaded once.
	img := make([]byte, 4<<20)
	for i := range img {
		img[i] = byte(i * 31)
	}
	sum := sha256.Sum256(img)
	sha := hex.EncodeToString(sum[:])
	var downloads atomic.Int64
	imgSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		downloads.Add(1)
		time.Sleep(200 * time.Millisecond) // keep the jobs overlapping
		http.ServeContent(w, r, "disk.img", time.Time{}, bytes.NewReader(img))
	}))
	defer imgSrv.Close()
	script := fmt.Sprintf(`job := import("job"); storage := import("storage")
img := storage.image(%q, %q)
if is_error(img) { job.fail(img.value) }
job.result(img.size)`, imgSrv.URL+"/disk.img", sha)
	var ids []string
	for i := 0; i < 10; i++ {
		raw := rawEnvelope(t, envelope.NewJob(fmt.Sprintf("image-%d", i), script, "local", time.Now()), f.admin)
		rep, err := f.client().Submit(context.Background(), raw)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, rep.ID)
	}
	for _, id := range ids {
		if j := f.waitJob(id, time.Minute); j.State != job.StateSucceeded || string(j.Result) != fmt.Sprint(len(img)) {
			t.Errorf("image job = %s %s (%s)", j.State, j.Result, j.Error)
		}
	}
	if n := downloads.Load(); n != 1 {
		t.Errorf("ten jobs downloaded the image %d times, want once", n)
	}

	// Restart the runner: the pool, its volume and its image are found again.
	poolArgs := []string{"runner", "--no-network", "--no-vm", "--site", "local", "--node", "p1", "--redis", f.redis, "--ledger", f.ledger,
		"--listen", "", "--pool-file", filepath.Join(f.dir, "pool.img"), "--pool-size", "1G", "--pool-mount", filepath.Join(f.dir, "pool"), "--image-allow", "127.0.0.1/32"}
	f.stop(f.procs["runner:pool"], syscall.SIGTERM)
	f.start("runner:pool2", poolArgs...)
	check := rawEnvelope(t, envelope.NewJob("after-restart", fmt.Sprintf(`job := import("job"); storage := import("storage")
job.result({volumes: len(storage.volumes()), image: storage.image("http://127.0.0.1:1/unreachable", %q).size, state: storage.read("data", "hello.txt")})`, sha), "local", time.Now()), f.admin)
	rep, err := f.client().Submit(context.Background(), check)
	if err != nil {
		t.Fatal(err)
	}
	if j := f.waitJob(rep.ID, time.Minute); j.State != job.StateSucceeded || !strings.Contains(string(j.Result), `"state":"stored by writ"`) || !strings.Contains(string(j.Result), `"volumes":1`) || !strings.Contains(string(j.Result), fmt.Sprint(len(img))) {
		t.Errorf("after the restart: %s %s (%s)", j.State, j.Result, j.Error)
	}

	// Stop the runner (it unmounts the pool) and check nothing is left.
	f.stop(f.procs["runner:pool2"], syscall.SIGTERM)
	mounts, _ := os.ReadFile("/proc/self/mounts")
	if strings.Contains(string(mounts), filepath.Join(f.dir, "pool")) {
		t.Error("the pool is still mounted after the runner stopped")
	}
}

// TestFleet_DSSEInterop: envelopes made by another DSSE implementation
// (go-securesystemslib) run: with an empty keyid, with its own keyid, and
// with a top-level member DSSE does not define. A payload that names a key
// twice in different case is refused as malformed, by coord already.
func TestFleet_DSSEInterop(t *testing.T) {
	t.Parallel()
	f := newFleet(t)
	f.startAll()
	ctx := context.Background()
	payload := func(name string) []byte {
		j := envelope.NewJob(name, `job := import("job"); job.result(job.args.n * 2)`, "local", time.Now())
		j.Args = json.RawMessage(`{"n":21}`)
		p, err := json.Marshal(j)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	extra := func(raw []byte) []byte {
		var m map[string]any
		json.Unmarshal(raw, &m)
		m["extension"] = map[string]any{"note": "ignored by consumers"}
		out, _ := json.Marshal(m)
		return out
	}
	for name, raw := range map[string][]byte{
		"empty keyid":     testenv.SSLibSign(t, f.admin, envelope.PayloadType, payload("empty keyid"), ""),
		"sslib keyid":     testenv.SSLibSign(t, f.admin, envelope.PayloadType, payload("sslib keyid"), testenv.SSLibKeyIDDefault),
		"extra top-level": extra(testenv.SSLibSign(t, f.admin, envelope.PayloadType, payload("extra"), "")),
	} {
		rep, err := f.client().Submit(ctx, raw)
		if err != nil {
			t.Fatalf("%s: submit = %v", name, err)
		}
		if j := f.waitJob(rep.ID, 30*time.Second); j.State != job.StateSucceeded || string(j.Result) != "42" {
			t.Errorf("%s: job = %s result %s (%s %s), want succeeded with 42", name, j.State, j.Result, j.Reason, j.Error)
		}
	}
	variant := []byte(strings.Replace(string(payload("variant")), `"script":`, `"Script":"x := 1","script":`, 1))
	_, err := f.client().Submit(ctx, testenv.SSLibSign(t, f.admin, envelope.PayloadType, variant, ""))
	var re *coord.RejectedError
	if !errors.As(err, &re) || re.Reply.Reason != job.ReasonMalformed || !strings.Contains(re.Reply.Error, "case-sensitive") {
		t.Errorf("case-variant payload = %v, want refused malformed", err)
	}
}

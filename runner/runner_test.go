package runner

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/scripts"
	"github.com/writ-fleet/writ/scripts/host"
	"github.com/writ-fleet/writ/verify"
)

type fixture struct {
	rdb    *queue.Redis
	admin  *keys.Key
	runner *Runner
	ledger *testenv.Ledger
	key    *keys.Key // the runner's node key
	node   string    // its ID
}

func newFixture(tb testing.TB, concurrency int) *fixture {
	tb.Helper()
	l := testenv.NewLedger(tb, ledger.Site{Name: "s", SupervisorURL: "http://127.0.0.1:1"})
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	rdb, err := queue.Connect(testenv.Redis(tb))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { rdb.Close() })
	key := l.Node(tb, "s")
	node := ledger.NodeID(key.Public)
	lc := &ledger.Client{BaseURL: l.URL}
	r, err := New(Params{Site: "s", Node: node, Key: key, Redis: rdb, Trust: &ledger.TrustCache{Client: lc}, Nodes: &ledger.NodeCache{Client: lc},
		Scripts: scripts.New(scripts.Config{}, host.Modules(host.Layers{})), Log: log, Concurrency: concurrency})
	if err != nil {
		tb.Fatal(err)
	}
	return &fixture{rdb: rdb, admin: l.Admin, runner: r, ledger: l, key: key, node: node}
}

func (f *fixture) enqueue(tb testing.TB, script, node string, mutate func(*envelope.Job)) string {
	tb.Helper()
	j := envelope.NewJob("t", script, "s", time.Now())
	j.Node = node
	if mutate != nil {
		mutate(j)
	}
	payload, _ := json.Marshal(j)
	env := envelope.New(envelope.PayloadType, payload)
	env.Sign(f.admin.ID, f.admin.Private)
	raw, _ := json.Marshal(env)
	q := queue.SiteQueue("s")
	if node != "" {
		q = queue.NodeQueue(node)
	}
	if _, err := f.rdb.Enqueue(context.Background(), queue.Task{ID: env.ID(), Envelope: raw, Queue: q, MaxRetry: j.MaxRetries, Timeout: j.RunTimeout()}); err != nil {
		tb.Fatal(err)
	}
	return env.ID()
}

// terminal collects the terminal event of each job from the site stream.
func (f *fixture) terminal(tb testing.TB, ids []string, timeout time.Duration) map[string]job.Event {
	tb.Helper()
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	out := map[string]job.Event{}
	after := "0"
	deadline := time.Now().Add(timeout)
	for len(out) < len(want) {
		if time.Now().After(deadline) {
			tb.Fatalf("only %d of %d jobs ended within %s", len(out), len(want), timeout)
		}
		evs, err := f.rdb.ReadEvents(context.Background(), "s", after, 1000, 200*time.Millisecond)
		if err != nil {
			tb.Fatal(err)
		}
		for _, ev := range evs {
			after = ev.Seq
			if want[ev.Job] && ev.Type.Terminal() {
				out[ev.Job] = ev
			}
		}
	}
	return out
}

func TestRunner_Handle(t *testing.T) {
	f := newFixture(t, 4)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.runner.Run(ctx) }()
	defer func() { cancel(); <-done }()

	ok := f.enqueue(t, `job := import("job"); log := import("log"); log.info("hi"); job.result(job.node)`, "", nil)
	pinned := f.enqueue(t, `job := import("job"); job.result("pinned")`, f.node, nil)
	other := f.enqueue(t, `job := import("job"); job.result(1)`, "", func(j *envelope.Job) { j.Site = "t" })
	expired := f.enqueue(t, `x := 1`, "", func(j *envelope.Job) {
		j.NotBefore, j.Expires = time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour)
	})
	timeout := f.enqueue(t, `for {}`, "", func(j *envelope.Job) { j.Timeout = envelope.Duration(300 * time.Millisecond) })
	crashed := f.enqueue(t, `x := 1; y := x.nope()`, "", nil)
	// A job pinned to another node that reached this one (through the site
	// queue) is refused.
	elsewhere := f.enqueue(t, `x := 1`, "", func(j *envelope.Job) { j.Node = "n2" })
	// A runner without the storage layer cannot run a storage job: that is
	// the host's unavailability, retried (here: no retries left, so failed).
	noPool := f.enqueue(t, `storage := import("storage"); storage.volumes()`, "", func(j *envelope.Job) { j.MaxRetries = 0 })

	got := f.terminal(t, []string{ok, pinned, other, expired, timeout, crashed, elsewhere, noPool}, 30*time.Second)
	for _, tc := range []struct {
		id     string
		typ    job.EventType
		reason job.Reason
		result string
	}{
		{ok, job.EventSucceeded, "", `"` + f.node + `"`},
		{pinned, job.EventSucceeded, "", `"pinned"`},
		{other, job.EventFailed, "wrong_site", ""},
		{expired, job.EventFailed, "expired", ""},
		{timeout, job.EventFailed, "timeout", ""},
		{crashed, job.EventFailed, "script_error", ""},
		{elsewhere, job.EventFailed, "wrong_node", ""},
		{noPool, job.EventFailed, "transient", ""},
	} {
		ev := got[tc.id]
		if ev.Type != tc.typ || ev.Reason != tc.reason || (tc.result != "" && string(ev.Result) != tc.result) {
			t.Errorf("job %s: %s %s %s (%s), want %s %s %s", tc.id[:8], ev.Type, ev.Reason, ev.Result, ev.Error, tc.typ, tc.reason, tc.result)
		}
	}
}

// BenchmarkRunner_Drain measures how fast one runner drains a queue of
// signed no-op jobs (verify + run + report).
func BenchmarkRunner_Drain(b *testing.B) {
	f := newFixture(b, 10)
	ids := make([]string, b.N)
	for i := range ids {
		ids[i] = f.enqueue(b, `job := import("job"); job.result(1)`, "", nil)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	b.ResetTimer()
	go func() { done <- f.runner.Run(ctx) }()
	f.terminal(b, ids, 5*time.Minute)
	b.StopTimer()
	cancel()
	<-done
}

// TestRunner_Steps: a step of a flow runs from the signed flow, reading
// job.inputs and job.item; one whose flow was altered in the queue, or
// that claims another step's job ID, is refused.
func TestRunner_Steps(t *testing.T) {
	f := newFixture(t, 2)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.runner.Run(ctx) }()
	defer func() { cancel(); <-done }()

	fl := envelope.NewFlow("f", "s", time.Now())
	fl.Steps = []envelope.Step{
		{Name: "fetch", Script: `job := import("job"); job.result(21)`},
		{Name: "double", Script: `job := import("job"); job.result([job.inputs.fetch * 2, job.item, job.attempt])`, DependsOn: []string{"fetch"},
			ForEach: json.RawMessage(`["x","y"]`), Retries: 1},
	}
	env, err := fl.Sign(f.admin)
	if err != nil {
		t.Fatal(err)
	}
	signed, _ := json.Marshal(env)
	enqueue := func(flowRaw []byte, st verify.StepTask, id string) string {
		st.Flow = flowRaw
		raw, _ := json.Marshal(st)
		if id == "" {
			id = envelope.StepJobID(env.ID(), st.Step, st.Item, st.Attempt)
		}
		if _, err := f.rdb.Enqueue(ctx, queue.Task{ID: id, Envelope: raw, Queue: queue.SiteQueue("s"), MaxRetry: 0, Timeout: time.Minute}); err != nil {
			t.Fatal(err)
		}
		return id
	}
	// fetch's output, as a node of the site signed it (run 1).
	fetchID := envelope.StepJobID(env.ID(), "fetch", 0, 1)
	proof := func(k *keys.Key, out string) map[string][]*envelope.OutputProof {
		sig, err := envelope.SignOutput(k.Private, fetchID, []byte(out))
		if err != nil {
			t.Fatal(err)
		}
		return map[string][]*envelope.OutputProof{"fetch": {{Attempt: 1, Node: ledger.NodeID(k.Public), Sig: sig}}}
	}
	peer := f.ledger.Node(t, "s") // another node of the site
	stranger, _ := keys.Generate("stranger")
	admin := &ledger.Client{BaseURL: f.ledger.URL, Key: f.admin}
	if err := admin.PutSite(ctx, ledger.Site{Name: "t", SupervisorURL: "http://127.0.0.1:1", Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}}); err != nil {
		t.Fatal(err)
	}
	foreign := f.ledger.Node(t, "t") // a node of another site
	double := func(item int, value, inputs string, proofs map[string][]*envelope.OutputProof) string {
		return enqueue(signed, verify.StepTask{Step: "double", Item: item, Attempt: 2, Value: json.RawMessage(value), Inputs: json.RawMessage(inputs), Proofs: proofs}, "")
	}
	ok := double(1, `"y"`, `{"fetch":21}`, proof(peer, "21"))
	unsigned := double(0, `"x"`, `{"fetch":21}`, nil)
	changed := enqueue(signed, verify.StepTask{Step: "double", Item: 0, Attempt: 1, Value: json.RawMessage(`"x"`), Inputs: json.RawMessage(`{"fetch":22}`), Proofs: proof(peer, "21")}, "")
	byStranger := enqueue(signed, verify.StepTask{Step: "double", Item: 1, Attempt: 1, Value: json.RawMessage(`"y"`), Inputs: json.RawMessage(`{"fetch":21}`), Proofs: proof(stranger, "21")}, "")
	byForeign := double(0, `"x"`, `{"fetch":21}`, proof(foreign, "21"))
	var wire map[string]any
	json.Unmarshal(signed, &wire)
	payload, _ := base64.StdEncoding.DecodeString(wire["payload"].(string))
	wire["payload"] = base64.StdEncoding.EncodeToString([]byte(strings.Replace(string(payload), "job.result(21)", "job.result(666)", 1)))
	alteredRaw, _ := json.Marshal(wire)
	// The altered flow is another flow (its ID is its payload's hash): the
	// carrier's job ID no longer matches, and one made to match still
	// carries no valid signature.
	alteredEnv, _ := envelope.Decode(alteredRaw)
	altered := enqueue(alteredRaw, verify.StepTask{Step: "fetch", Attempt: 1}, envelope.StepJobID(alteredEnv.ID(), "fetch", 0, 1))
	alteredID := enqueue(alteredRaw, verify.StepTask{Step: "fetch", Attempt: 1}, "")
	swapped := enqueue(signed, verify.StepTask{Step: "fetch", Attempt: 1}, strings.Repeat("ab", 32))

	got := f.terminal(t, []string{ok, unsigned, changed, byStranger, byForeign, altered, alteredID, swapped}, 30*time.Second)
	if ev := got[ok]; ev.Type != job.EventSucceeded || string(ev.Result) != `[42,"y",2]` {
		t.Errorf("step: %s %s %s", ev.Type, ev.Result, ev.Error)
	} else if err := envelope.VerifyOutput(f.key.Public, ok, ev.Result, ev.ResultSig); err != nil || ev.Node != f.node {
		t.Errorf("the step's output is not signed by its node (%s): %v", ev.Node, err)
	}
	for name, id := range map[string]string{"unsigned": unsigned, "changed": changed, "by a stranger": byStranger, "by another site's node": byForeign} {
		if ev := got[id]; ev.Type != job.EventFailed || ev.Reason != "bad_input" {
			t.Errorf("input %s: %s %s %s", name, ev.Type, ev.Reason, ev.Error)
		}
	}
	if ev := got[altered]; ev.Type != job.EventFailed || ev.Reason != "bad_signature" {
		t.Errorf("altered step: %s %s %s", ev.Type, ev.Reason, ev.Error)
	}
	if ev := got[alteredID]; ev.Type != job.EventFailed || ev.Reason != "id_mismatch" {
		t.Errorf("altered step under the original ID: %s %s %s", ev.Type, ev.Reason, ev.Error)
	}
	if ev := got[swapped]; ev.Type != job.EventFailed || ev.Reason != "id_mismatch" {
		t.Errorf("swapped step: %s %s %s", ev.Type, ev.Reason, ev.Error)
	}
}

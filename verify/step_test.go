package verify_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"github.com/writ-fleet/writ/job"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/verify"
)

// twoSites is a ledger with sites "local" and "pair" (which needs two
// signers), and a trust source over it.
func twoSites(t *testing.T) (*testenv.Ledger, *ledger.TrustCache) {
	t.Helper()
	l := testenv.NewLedger(t, ledger.Site{Name: "local", SupervisorURL: "http://127.0.0.1:1"})
	admin := &ledger.Client{BaseURL: l.URL, Key: l.Admin}
	if err := admin.PutSite(context.Background(), ledger.Site{Name: "pair", SupervisorURL: "http://127.0.0.1:1", Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 2}}); err != nil {
		t.Fatal(err)
	}
	return l, &ledger.TrustCache{Client: &ledger.Client{BaseURL: l.URL}}
}

func TestStepJob(t *testing.T) {
	l, trust := twoSites(t)
	ctx := context.Background()
	now := time.Now()
	fl := envelope.NewFlow("f", "local", now)
	fl.Args = json.RawMessage(`{"items":["a","b"]}`)
	fl.Steps = []envelope.Step{
		{Name: "fetch", Script: `x := 1`},
		{Name: "each", Script: `x := 2`, ForEach: json.RawMessage(`"args.items"`), DependsOn: []string{"fetch"}},
		{Name: "pinned", Script: `x := 3`, Node: "n1"},
		{Name: "there", Script: `x := 4`, Site: "pair"},
	}
	env, err := fl.Sign(l.Admin)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(env)
	flowID := env.ID()
	// altered: the payload changed after signing, as Redis or coord could.
	var wire map[string]any
	json.Unmarshal(raw, &wire)
	payload, _ := base64.StdEncoding.DecodeString(wire["payload"].(string))
	wire["payload"] = base64.StdEncoding.EncodeToString([]byte(strings.Replace(string(payload), `x := 1`, `x := 666`, 1)))
	altered, _ := json.Marshal(wire)
	stranger, _ := keys.Generate("stranger")
	strangerEnv, _ := fl.Sign(stranger)
	strangerRaw, _ := json.Marshal(strangerEnv)
	expired := *fl
	expired.SignedAt, expired.Expires = now.Add(-2*time.Hour), now.Add(-time.Hour)
	expiredEnv, _ := expired.Sign(l.Admin)
	expiredRaw, _ := json.Marshal(expiredEnv)

	task := func(step string, item int, value string) *verify.StepTask {
		st := &verify.StepTask{Flow: raw, Step: step, Item: item, Attempt: 1}
		if value != "" {
			st.Value = json.RawMessage(value)
		}
		return st
	}
	with := func(st *verify.StepTask, edit func(*verify.StepTask)) *verify.StepTask { edit(st); return st }
	for _, tc := range []struct {
		name   string
		task   *verify.StepTask
		target verify.Target
		want   job.Reason
	}{
		{"a step", task("fetch", 0, ""), verify.Target{Site: "local", ID: envelope.StepJobID(flowID, "fetch", 0, 1)}, ""},
		{"a fan-out item", with(task("each", 1, `"b"`), func(s *verify.StepTask) { s.Inputs = json.RawMessage(`{"fetch":1}`) }), verify.Target{Site: "local"}, ""},
		{"altered in transit", &verify.StepTask{Flow: altered, Step: "fetch", Attempt: 1}, verify.Target{Site: "local"}, "bad_signature"},
		{"below the threshold", task("there", 0, ""), verify.Target{Site: "pair"}, "below_threshold"},
		{"unknown signer", &verify.StepTask{Flow: strangerRaw, Step: "fetch", Attempt: 1}, verify.Target{Site: "local"}, "unknown_key"},
		{"no such step", task("nope", 0, ""), verify.Target{Site: "local"}, "invalid_job"},
		{"another site's step", task("there", 0, ""), verify.Target{Site: "local"}, "wrong_site"},
		{"another node's step", task("pinned", 0, ""), verify.Target{Site: "local", Node: "n2"}, "wrong_node"},
		{"another job ID", task("fetch", 0, ""), verify.Target{Site: "local", ID: envelope.StepJobID(flowID, "fetch", 0, 2)}, "id_mismatch"},
		{"a run past the retries", with(task("fetch", 0, ""), func(s *verify.StepTask) { s.Attempt = 2 }), verify.Target{Site: "local"}, "invalid_job"},
		{"run 0", with(task("fetch", 0, ""), func(s *verify.StepTask) { s.Attempt = 0 }), verify.Target{Site: "local"}, "invalid_job"},
		{"item of a step without for_each", task("fetch", 1, ""), verify.Target{Site: "local"}, "invalid_job"},
		{"item past the list", task("each", 2, `"c"`), verify.Target{Site: "local"}, "invalid_job"},
		{"item value swapped", task("each", 0, `"rm -rf"`), verify.Target{Site: "local"}, "invalid_job"},
		{"input from a step it does not depend on", with(task("fetch", 0, ""), func(s *verify.StepTask) { s.Inputs = json.RawMessage(`{"each":1}`) }), verify.Target{Site: "local"}, "invalid_job"},
		{"inputs not an object", with(task("each", 0, `"a"`), func(s *verify.StepTask) { s.Inputs = json.RawMessage(`[1]`) }), verify.Target{Site: "local"}, "malformed"},
		{"expired flow", &verify.StepTask{Flow: expiredRaw, Step: "fetch", Attempt: 1}, verify.Target{Site: "local"}, "expired"},
		{"a job, not a flow", &verify.StepTask{Flow: mustJob(t, l.Admin), Step: "fetch"}, verify.Target{Site: "local"}, "payload_type"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, step, err := verify.StepJob(ctx, trust, tc.task, tc.target, now)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if c.ID != envelope.StepJobID(flowID, tc.task.Step, tc.task.Item, tc.task.Attempt) || step.FlowID != flowID || c.Owner != "root" || !strings.HasPrefix(c.Job.Script, "x := ") {
					t.Errorf("checked %+v, step %+v", c, step)
				}
				return
			}
			if err == nil || verify.Reason(err) != tc.want {
				t.Fatalf("StepJob = %v, want %s", err, tc.want)
			}
		})
	}
}

func mustJob(t *testing.T, k *keys.Key) json.RawMessage {
	e, err := envelope.NewJob("j", "x := 1", "local", time.Now()).Sign(k)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(e)
	return b
}

// TestStepJob_Inputs: a step reads its dependencies' outputs only as the
// nodes of their sites signed them, each for its own item, all of them.
func TestStepJob_Inputs(t *testing.T) {
	l := testenv.NewLedger(t, ledger.Site{Name: "local", SupervisorURL: "http://127.0.0.1:1"})
	ctx := context.Background()
	lc := &ledger.Client{BaseURL: l.URL}
	trust := &ledger.TrustCache{Client: lc}
	nodes := &ledger.NodeCache{Client: lc}
	node := l.Node(t, "local")
	now := time.Now()
	fl := envelope.NewFlow("f", "local", now)
	fl.Args = json.RawMessage(`{"items":["a","b"]}`)
	fl.Steps = []envelope.Step{
		{Name: "list", Script: `x := 1`},
		{Name: "each", Script: `x := 2`, ForEach: json.RawMessage(`"args.items"`), Retries: 1},
		{Name: "sum", Script: `x := 3`, DependsOn: []string{"each"}},
		{Name: "over", Script: `x := 4`, DependsOn: []string{"list"}, ForEach: json.RawMessage(`"list"`)},
		{Name: "maybe", Script: `x := 5`, ForEach: json.RawMessage(`[1,2]`), ContinueOnFailure: true},
		{Name: "after", Script: `x := 6`, DependsOn: []string{"maybe"}},
	}
	env, err := fl.Sign(l.Admin)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(env)
	flowID := env.ID()
	sign := func(step string, item, attempt int, out string) *envelope.OutputProof {
		sig, err := envelope.SignOutput(node.Private, envelope.StepJobID(flowID, step, item, attempt), []byte(out))
		if err != nil {
			t.Fatal(err)
		}
		return &envelope.OutputProof{Attempt: attempt, Node: ledger.NodeID(node.Public), Sig: sig}
	}
	a, b := sign("each", 0, 1, `"A"`), sign("each", 1, 2, `"B"`)
	// A node revoked since it signed.
	gone := l.Node(t, "local")
	goneSig, _ := envelope.SignOutput(gone.Private, envelope.StepJobID(flowID, "each", 1, 1), []byte(`"B"`))
	if _, err := (&ledger.Client{BaseURL: l.URL, Key: l.Admin}).RevokeNode(ctx, ledger.NodeID(gone.Public)); err != nil {
		t.Fatal(err)
	}
	revoked := &envelope.OutputProof{Attempt: 1, Node: ledger.NodeID(gone.Public), Sig: goneSig}
	list := sign("list", 0, 1, `["p","q"]`)
	target := verify.Target{Site: "local", Nodes: nodes}
	for _, tc := range []struct {
		name   string
		task   verify.StepTask
		target verify.Target
		want   job.Reason
	}{
		{"a fan-in", verify.StepTask{Step: "sum", Inputs: json.RawMessage(`{"each":["A","B"]}`), Proofs: map[string][]*envelope.OutputProof{"each": {a, b}}}, target, ""},
		{"items swapped", verify.StepTask{Step: "sum", Inputs: json.RawMessage(`{"each":["B","A"]}`), Proofs: map[string][]*envelope.OutputProof{"each": {b, a}}}, target, "bad_input"},
		{"an item left out", verify.StepTask{Step: "sum", Inputs: json.RawMessage(`{"each":["A"]}`), Proofs: map[string][]*envelope.OutputProof{"each": {a}}}, target, "bad_input"},
		{"a proof left out", verify.StepTask{Step: "sum", Inputs: json.RawMessage(`{"each":["A","B"]}`), Proofs: map[string][]*envelope.OutputProof{"each": {a, nil}}}, target, "bad_input"},
		{"no inputs at all", verify.StepTask{Step: "sum"}, target, "bad_input"},
		{"by a revoked node", verify.StepTask{Step: "sum", Inputs: json.RawMessage(`{"each":["A","B"]}`), Proofs: map[string][]*envelope.OutputProof{"each": {a, revoked}}}, target, "bad_input"},
		{"a run past the retries", verify.StepTask{Step: "sum", Inputs: json.RawMessage(`{"each":["A","B"]}`), Proofs: map[string][]*envelope.OutputProof{"each": {a, sign("each", 1, 3, `"B"`)}}}, target, "bad_input"},
		{"unsigned, where allowed", verify.StepTask{Step: "sum", Inputs: json.RawMessage(`{"each":["A","B"]}`)}, verify.Target{Site: "local", Nodes: nodes, UnsignedInputs: true}, ""},
		{"a bad proof, where unsigned is allowed", verify.StepTask{Step: "sum", Inputs: json.RawMessage(`{"each":["A","X"]}`), Proofs: map[string][]*envelope.OutputProof{"each": {a, b}}},
			verify.Target{Site: "local", Nodes: nodes, UnsignedInputs: true}, "bad_input"},
		{"not checked without nodes (the supervisor)", verify.StepTask{Step: "sum", Inputs: json.RawMessage(`{"each":["A","X"]}`)}, verify.Target{Site: "local"}, ""},
		{"the item of a proven list", verify.StepTask{Step: "over", Item: 1, Value: json.RawMessage(`"q"`), Inputs: json.RawMessage(`{"list":["p","q"]}`),
			Proofs: map[string][]*envelope.OutputProof{"list": {list}}}, target, ""},
		{"another value than the proven list's", verify.StepTask{Step: "over", Item: 1, Value: json.RawMessage(`"rm"`), Inputs: json.RawMessage(`{"list":["p","q"]}`),
			Proofs: map[string][]*envelope.OutputProof{"list": {list}}}, target, "invalid_job"},
		{"a failed item of a step that continues", verify.StepTask{Step: "after", Inputs: json.RawMessage(`{"maybe":[null,"B"]}`),
			Proofs: map[string][]*envelope.OutputProof{"maybe": {nil, sign("maybe", 1, 1, `"B"`)}}}, target, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			task := tc.task
			task.Flow = raw
			if task.Attempt == 0 {
				task.Attempt = 1
			}
			_, _, err := verify.StepJob(ctx, trust, &task, tc.target, now)
			if tc.want == "" && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if tc.want != "" && (err == nil || verify.Reason(err) != tc.want) {
				t.Fatalf("StepJob = %v, want %s", err, tc.want)
			}
		})
	}
}

// BenchmarkStepJob: checking one step of a fan-out whose flow is padded to
// about 700 KiB (every item's task carries or is given the same flow).
func BenchmarkStepJob(b *testing.B) {
	l := testenv.NewLedger(b, ledger.Site{Name: "local", SupervisorURL: "http://127.0.0.1:1"})
	trust := &ledger.TrustCache{Client: &ledger.Client{BaseURL: l.URL}}
	now := time.Now()
	fl := envelope.NewFlow("f", "local", now)
	fl.Args, _ = json.Marshal(map[string]string{"pad": strings.Repeat("x", 512<<10)})
	fl.Steps = []envelope.Step{{Name: "each", Script: `x := 1`, ForEach: json.RawMessage(`[1,2,3]`)}}
	env, err := fl.Sign(l.Admin)
	if err != nil {
		b.Fatal(err)
	}
	raw, _ := json.Marshal(env)
	ctx := context.Background()
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		task := &verify.StepTask{Flow: raw, Step: "each", Item: i % 3, Attempt: 1, Value: json.RawMessage(strconv.Itoa(i%3 + 1))}
		if _, _, err := verify.StepJob(ctx, trust, task, verify.Target{Site: "local"}, now); err != nil {
			b.Fatal(err)
		}
	}
}

// TestFlow: coord's one check of a submitted flow: every site its steps
// run on must accept the signatures; an unknown site is wrong_site, as for
// a job (not "unavailable"); an expired or unsigned flow is refused; a
// ledger that cannot be reached judges nothing.
func TestFlow(t *testing.T) {
	l, trust := twoSites(t)
	ctx := context.Background()
	now := time.Now()
	flowOn := func(sites ...string) *envelope.Flow {
		fl := envelope.NewFlow("f", "local", now)
		for i, s := range sites {
			fl.Steps = append(fl.Steps, envelope.Step{Name: fmt.Sprintf("s%d", i), Script: `x := 1`, Site: s})
		}
		return fl
	}
	sign := func(fl *envelope.Flow) *envelope.Envelope {
		env, err := fl.Sign(l.Admin)
		if err != nil {
			t.Fatal(err)
		}
		return env
	}
	expired := flowOn("local")
	expired.SignedAt, expired.Expires = now.Add(-2*time.Hour), now.Add(-time.Hour)
	unsigned := sign(flowOn("local"))
	unsigned.Signatures = nil
	for _, tc := range []struct {
		name string
		env  *envelope.Envelope
		want job.Reason
	}{
		{"one site", sign(flowOn("local")), ""},
		{"an unknown site", sign(flowOn("local", "nowhere")), job.ReasonWrongSite},
		{"below a site's threshold", sign(flowOn("local", "pair")), job.ReasonBelowThreshold},
		{"expired", sign(expired), job.ReasonExpired},
		{"unsigned", unsigned, job.ReasonNoSignature},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := verify.Flow(ctx, trust, tc.env, nil, now)
			if got := envelope.ReasonOf(err); got != tc.want || tc.want == "" && (err != nil || c.Signers[0] != "root") {
				t.Errorf("Flow = %v (reason %q), want reason %q", err, got, tc.want)
			}
		})
	}
	down := &ledger.TrustCache{Client: &ledger.Client{BaseURL: "http://127.0.0.1:1"}}
	if _, err := verify.Flow(ctx, down, sign(flowOn("local")), nil, now); !verify.Retry(err) {
		t.Errorf("Flow with the ledger down = %v, want ErrUnavailable", err)
	}
}

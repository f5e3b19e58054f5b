package verify_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/verify"
)

func TestStepJob(t *testing.T) {
	l := testenv.NewLedger(t, ledger.Site{Name: "local", SupervisorURL: "http://127.0.0.1:1"})
	admin := &ledger.Client{BaseURL: l.URL, Key: l.Admin}
	ctx := context.Background()
	// Site "pair" needs two signers.
	if err := admin.PutSite(ctx, ledger.Site{Name: "pair", SupervisorURL: "http://127.0.0.1:1", Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 2}}); err != nil {
		t.Fatal(err)
	}
	trust := &ledger.TrustCache{Client: &ledger.Client{BaseURL: l.URL}}
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
		want   string
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

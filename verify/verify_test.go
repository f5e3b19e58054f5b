package verify_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/verify"
)

func sslibSign(t *testing.T, k *keys.Key, payload []byte, keyID string) []byte {
	if keyID == "default" {
		keyID = testenv.SSLibKeyIDDefault
	}
	return testenv.SSLibSign(t, k, envelope.PayloadType, payload, keyID)
}

func TestJob(t *testing.T) {
	l := testenv.NewLedger(t, ledger.Site{Name: "local", SupervisorURL: "http://127.0.0.1:1"})
	trust := &ledger.TrustCache{Client: &ledger.Client{BaseURL: l.URL}}
	ctx := context.Background()
	now := time.Now()
	stranger, _ := keys.Generate("stranger")
	payload := func(mut func(*envelope.Job)) []byte {
		j := envelope.NewJob("t", `x := 1`, "local", now)
		j.Node = "n1"
		if mut != nil {
			mut(j)
		}
		b, err := json.Marshal(j)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	writSigned := func(p []byte, k *keys.Key) []byte {
		e := envelope.New(envelope.PayloadType, p)
		e.Sign(k.ID, k.Private)
		raw, _ := json.Marshal(e)
		return raw
	}
	withField := func(raw []byte, name string, v any) []byte {
		var m map[string]any
		json.Unmarshal(raw, &m)
		m[name] = v
		out, _ := json.Marshal(m)
		return out
	}
	good := writSigned(payload(nil), l.Admin)
	caseVariant := []byte(strings.Replace(string(payload(nil)), `"script":"x := 1"`, `"script":"x := 1","Script":"x := 2"`, 1))
	for _, tc := range []struct {
		name   string
		raw    []byte
		target verify.Target
		want   job.Reason // "" for accepted
	}{
		{"writ signed", good, verify.Target{Site: "local", Node: "n1"}, ""},
		{"sslib, empty keyid", sslibSign(t, l.Admin, payload(nil), ""), verify.Target{Site: "local"}, ""},
		{"sslib, its default keyid", sslibSign(t, l.Admin, payload(nil), "default"), verify.Target{Site: "local"}, ""},
		{"sslib, another key's keyid", sslibSign(t, l.Admin, payload(nil), stranger.ID), verify.Target{Site: "local"}, ""},
		{"extra top-level field", withField(good, "extension", map[string]any{"x": 1}), verify.Target{Site: "local"}, ""},
		{"case-variant duplicate key", writSigned(caseVariant, l.Admin), verify.Target{Site: "local"}, "malformed"},
		{"stranger, empty keyid", sslibSign(t, stranger, payload(nil), ""), verify.Target{Site: "local"}, "unknown_key"},
		{"stranger posing as admin", sslibSign(t, stranger, payload(nil), l.Admin.ID), verify.Target{Site: "local"}, "bad_signature"},
		{"other site", good, verify.Target{Site: "elsewhere"}, "wrong_site"},
		{"other node", good, verify.Target{Site: "local", Node: "n2"}, "wrong_node"},
		{"swapped in transit", good, verify.Target{Site: "local", ID: strings.Repeat("0", 64)}, "id_mismatch"},
		{"expired", writSigned(payload(func(j *envelope.Job) { j.NotBefore, j.Expires = now.Add(-2*time.Hour), now.Add(-time.Hour) }), l.Admin), verify.Target{Site: "local"}, "expired"},
		{"no site", writSigned(payload(func(j *envelope.Job) { j.Site = "" }), l.Admin), verify.Target{Site: "local"}, "wrong_site"},
		{"site the ledger does not know", writSigned(payload(func(j *envelope.Job) { j.Site = "ghost" }), l.Admin), verify.Target{Site: "ghost"}, "wrong_site"},
		{"not an envelope", []byte(`{"payload":`), verify.Target{Site: "local"}, "malformed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id, c, err := verify.Job(ctx, trust, tc.raw, tc.target, now)
			if got := verify.Reason(err); got != tc.want {
				t.Fatalf("Job reason = %q (%v), want %q", got, err, tc.want)
			}
			if verify.Retry(err) {
				t.Errorf("Retry(%v) = true for a refusal", err)
			}
			if tc.want == "" {
				if c == nil || c.ID != id || len(c.Signers) != 1 || c.Signers[0] != "root" {
					t.Errorf("Job = %+v, want root as the signer", c)
				}
				return
			}
			if tc.want != "malformed" && id == "" {
				t.Errorf("a refused envelope came back without its ID")
			}
		})
	}

	// A ledger that cannot be reached judges nothing: retry later.
	l.Server.Close()
	cold := &ledger.TrustCache{Client: &ledger.Client{BaseURL: l.URL}}
	_, _, err := verify.Job(ctx, cold, good, verify.Target{Site: "local"}, now)
	if !verify.Retry(err) || !errors.Is(err, verify.ErrUnavailable) || verify.Reason(err) != job.ReasonLedgerUnavailable {
		t.Errorf("Job with the ledger down = %v, want ErrUnavailable", err)
	}
}

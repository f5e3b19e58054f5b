package coord

import (
	"context"
	"github.com/writ-fleet/writ/job"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
)

// TestCoord_ChooseSite: a job for any site goes to a site whose policy its
// signatures satisfy (its own Site first), and with resources only where
// a node has room; otherwise it is refused with the reason per site.
func TestCoord_ChooseSite(t *testing.T) {
	ctx := context.Background()
	l := testenv.NewLedger(t, ledger.Site{Name: "lab", SupervisorURL: "http://127.0.0.1:1"})
	admin := &ledger.Client{BaseURL: l.URL, Key: l.Admin}
	// Site "strict" needs two signers; one admin key satisfies only "lab"
	// and "wide".
	for _, s := range []ledger.Site{
		{Name: "strict", SupervisorURL: "http://127.0.0.1:2", Policy: ledger.Policy{Roles: []string{"admin"}, Threshold: 2}},
		{Name: "wide", SupervisorURL: "http://127.0.0.1:3", Policy: ledger.Policy{Roles: []string{"admin"}, Threshold: 1}},
	} {
		if err := admin.PutSite(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	rdb, err := queue.Connect(testenv.Redis(t))
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	c, err := New(Params{Redis: rdb, Ledger: &ledger.Client{BaseURL: l.URL}, Trust: &ledger.TrustCache{Client: &ledger.Client{BaseURL: l.URL}}, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	choose := func(preferred string, res envelope.Resources) (string, string, error) {
		j := envelope.NewJob("any", "x := 1", preferred, time.Now())
		j.AnySite, j.Resources = true, res
		env, err := j.Sign(l.Admin)
		if err != nil {
			t.Fatal(err)
		}
		site, node, _, err := c.chooseSite(ctx, env, j, env.ID())
		return site, node, err
	}
	if site, _, err := choose("", envelope.Resources{}); err != nil || site != "lab" {
		t.Errorf("any site = %s, %v; want lab (the first by name whose policy passes)", site, err)
	}
	if site, _, err := choose("wide", envelope.Resources{}); err != nil || site != "wide" {
		t.Errorf("any site preferring wide = %s, %v", site, err)
	}
	if site, _, err := choose("strict", envelope.Resources{}); err != nil || site == "strict" {
		t.Errorf("preferring strict (below its threshold) = %s, %v; want another site", site, err)
	}
	// With resources: only "wide" has a node.
	registerNodesOn(t, l, "wide", 4)
	site, node, err := choose("", envelope.Resources{CPU: 2})
	if err != nil || site != "wide" || node == "" {
		t.Errorf("any site with 2 CPUs = %s/%s, %v; want wide and its node", site, node, err)
	}
	_, _, err = choose("", envelope.Resources{CPU: 64})
	if envelope.ReasonOf(err) != job.ReasonNoCapacity || !strings.Contains(err.Error(), "strict:") || !strings.Contains(err.Error(), "has no registered nodes") {
		t.Errorf("any site with 64 CPUs = %v, want no_capacity with a reason per site", err)
	}
}

// registerNodesOn registers one online node with cpus CPUs on site.
func registerNodesOn(t *testing.T, l *testenv.Ledger, site string, cpus int) {
	t.Helper()
	ctx := context.Background()
	admin := &ledger.Client{BaseURL: l.URL, Key: l.Admin}
	tok, err := admin.CreateTokenFor(ctx, site, ledger.CreateTokenRequest{Uses: 100})
	if err != nil {
		t.Fatal(err)
	}
	k, _ := keys.Generate("node")
	nc := ledger.NodeClient(l.URL, k, nil)
	n, err := nc.Register(ctx, ledger.RegisterRequest{Site: site, Token: tok.Secret, PublicKey: k.AuthorizedKey(), Capacity: ledger.Capacity{CPUs: cpus, MemoryMiB: 4096}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := nc.ReportUptime(ctx, n.ID, ledger.Uptime{BootID: "b", At: time.Now()}); err != nil {
		t.Fatal(err)
	}
}

package ledger_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/httpsig"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
)

func TestNodes_Registration(t *testing.T) {
	bothStores(t, func(t *testing.T, kind string) {
		ctx := context.Background()
		clk := testenv.NewClock()
		f := newFixtureOn(t, kind, clk.Now)
		if err := f.client.PutSite(ctx, ledger.Site{Name: "other", SupervisorURL: "http://127.0.0.1:2", Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}}); err != nil {
			t.Fatal(err)
		}
		tok, err := f.client.CreateToken(ctx, "local", 0)
		if err != nil || !strings.HasPrefix(tok.Secret, "writ-enroll-") {
			t.Fatalf("CreateToken = %+v, %v", tok, err)
		}
		otherTok, _ := f.client.CreateToken(ctx, "other", 0)
		shortTok, _ := f.client.CreateToken(ctx, "local", 1)
		revoked, _ := f.client.CreateToken(ctx, "local", 0)
		if _, err := f.client.RevokeToken(ctx, "local", revoked.ID); err != nil {
			t.Fatal(err)
		}
		if list, _ := f.client.Tokens(ctx, "local"); len(list) != 3 || list[0].Secret != "" {
			t.Errorf("Tokens = %+v, want 3 without secrets", list)
		}

		nodeKey, _ := keys.Generate("node-1")
		nc := ledger.NodeClient(f.url, nodeKey, nil)
		req := ledger.RegisterRequest{Site: "local", Token: tok.Secret, PublicKey: nodeKey.AuthorizedKey(),
			Facts: ledger.Facts{Hostname: "node-1", CPUs: 4, MemoryMiB: 8192}, Capacity: ledger.Capacity{CPUs: 4, MemoryMiB: 8192}}
		clk.Add(1100 * time.Millisecond) // let shortTok expire
		for _, tc := range []struct {
			name string
			edit func(*ledger.RegisterRequest)
			want string
		}{
			{"bad token", func(r *ledger.RegisterRequest) { r.Token = "writ-enroll-nope" }, "HTTP 403"},
			{"another site's token", func(r *ledger.RegisterRequest) { r.Token = otherTok.Secret }, "HTTP 403"},
			{"expired token", func(r *ledger.RegisterRequest) { r.Token = shortTok.Secret }, "expired"},
			{"revoked token", func(r *ledger.RegisterRequest) { r.Token = revoked.Secret }, "revoked"},
			{"bad public key", func(r *ledger.RegisterRequest) { r.PublicKey = "ssh-rsa AAAA" }, "HTTP 400"},
		} {
			r := req
			tc.edit(&r)
			if _, err := nc.Register(ctx, r); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s: Register = %v, want %q", tc.name, err, tc.want)
			}
		}
		// Signed by another key than the one in the body.
		mallory, _ := keys.Generate("mallory")
		mc := &ledger.Client{BaseURL: f.url, Key: mallory, KeyID: ledger.NodeID(nodeKey.Public)}
		if _, err := mc.Register(ctx, req); err == nil || !strings.Contains(err.Error(), "HTTP 401") {
			t.Errorf("Register signed by another key = %v, want HTTP 401", err)
		}

		n, err := nc.Register(ctx, req)
		if err != nil || n.ID != ledger.NodeID(nodeKey.Public) || n.Site != "local" || n.Capacity.CPUs != 4 {
			t.Fatalf("Register = %+v, %v", n, err)
		}
		req.Capacity.CPUs = 8
		if again, err := nc.Register(ctx, req); err != nil || again.ID != n.ID || again.Capacity.CPUs != 8 {
			t.Errorf("Register again = %+v, %v; want the same node, updated", again, err)
		}
		moved := req
		moved.Site, moved.Token = "other", otherTok.Secret
		if _, err := nc.Register(ctx, moved); err == nil || !strings.Contains(err.Error(), "HTTP 409") {
			t.Errorf("Register on another site = %v, want HTTP 409", err)
		}

		// A replayed request (same signature and nonce) is refused.
		body, _ := json.Marshal(req)
		hr, _ := http.NewRequest("POST", f.url+"/v1/nodes/register", bytes.NewReader(body))
		hr.Header.Set("Content-Type", "application/json")
		httpsig.Sign(hr, body, ledger.NodeID(nodeKey.Public), nodeKey.Private, time.Now())
		for i, want := range []int{200, 401} {
			replay := hr.Clone(ctx)
			replay.Body = ioNopCloser(body)
			resp, err := http.DefaultClient.Do(replay)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != want {
				t.Errorf("request %d: status %d, want %d", i+1, resp.StatusCode, want)
			}
		}

		// Registration and token writes are in the audit log.
		entries, err := f.client.Audit(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ops := map[string]int{}
		for _, e := range entries {
			ops[e.Op]++
			if strings.Contains(e.Detail, "writ-enroll-") {
				t.Errorf("a token secret reached the audit log: %+v", e)
			}
		}
		if ops["register_node"] != 1 || ops["create_token"] != 4 || ops["revoke_token"] != 1 {
			t.Errorf("audit ops = %v", ops)
		}
	})
}

func TestNodes_UptimeAndLiveness(t *testing.T) {
	bothStores(t, func(t *testing.T, kind string) {
		ctx := context.Background()
		clk := testenv.NewClock()
		f := newFixtureOn(t, kind, clk.Now)
		if err := f.client.PutSite(ctx, ledger.Site{Name: "local", SupervisorURL: "http://127.0.0.1:1", Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}, UptimeInterval: 10}); err != nil {
			t.Fatal(err)
		}
		tok, _ := f.client.CreateToken(ctx, "local", 0)
		nodeKey, _ := keys.Generate("node-1")
		nc := ledger.NodeClient(f.url, nodeKey, nil)
		n, err := nc.Register(ctx, ledger.RegisterRequest{Site: "local", Token: tok.Secret, PublicKey: nodeKey.AuthorizedKey()})
		if err != nil {
			t.Fatal(err)
		}
		if n.Liveness != ledger.LivenessOffline {
			t.Errorf("liveness before any report = %s, want offline", n.Liveness)
		}
		report := func(boot string, at time.Time) (*ledger.UptimeReply, error) {
			return nc.ReportUptime(ctx, n.ID, ledger.Uptime{BootID: boot, UptimeSeconds: 5, At: at})
		}
		rep, err := report("boot-1", clk.Now())
		if err != nil || rep.Restarted || rep.Liveness != ledger.LivenessOnline || rep.Interval != 10 {
			t.Fatalf("first report = %+v, %v", rep, err)
		}
		// A report no later than the last is refused: a replay (the
		// uptime path's replay guard is that each node's reports move
		// forward).
		if _, err := report("boot-1", clk.Now()); err == nil || !strings.Contains(err.Error(), "HTTP 409") {
			t.Errorf("a report at the last one's time = %v, want HTTP 409", err)
		}
		clk.Add(time.Second)
		if rep, err := report("boot-2", clk.Now()); err != nil || !rep.Restarted || rep.Boots != 2 {
			t.Errorf("report after a reboot = %+v, %v; want restarted", rep, err)
		}
		for _, at := range []time.Time{clk.Now().Add(-3 * time.Minute), clk.Now().Add(3 * time.Minute)} {
			if _, err := report("boot-2", at); err == nil || !strings.Contains(err.Error(), "HTTP 400") {
				t.Errorf("report at %s = %v, want HTTP 400 (outside the window)", at, err)
			}
		}
		// Another node may not report for this one.
		otherKey, _ := keys.Generate("node-2")
		if _, err := ledger.NodeClient(f.url, otherKey, nil).ReportUptime(ctx, n.ID, ledger.Uptime{BootID: "x", At: clk.Now()}); err == nil || !strings.Contains(err.Error(), "HTTP 40") {
			t.Errorf("report signed by another node = %v", err)
		}
		// Liveness follows the clock: online within 2 intervals, stale
		// within 5, then offline.
		for _, step := range []struct {
			advance time.Duration
			want    string
		}{{15 * time.Second, ledger.LivenessOnline}, {20 * time.Second, ledger.LivenessStale}, {30 * time.Second, ledger.LivenessOffline}} {
			clk.Add(step.advance)
			got, err := f.client.Node(ctx, n.ID)
			if err != nil || got.Liveness != step.want {
				t.Errorf("after +%s: liveness %s (%v), want %s", step.advance, got.Liveness, err, step.want)
			}
		}
		if list, _ := f.client.Nodes(ctx, "local"); len(list) != 1 || list[0].Liveness != ledger.LivenessOffline || list[0].Boots != 2 {
			t.Errorf("Nodes = %+v", list)
		}

		// A report the node queued while the ledger was away is older
		// than the window: taken if it says it waited, up to a week old,
		// and still only if it moves forward.
		otherTok, _ := f.client.CreateToken(ctx, "local", 0)
		lateKey, _ := keys.Generate("node-3")
		lc := ledger.NodeClient(f.url, lateKey, nil)
		ln, err := lc.Register(ctx, ledger.RegisterRequest{Site: "local", Token: otherTok.Secret, PublicKey: lateKey.AuthorizedKey()})
		if err != nil {
			t.Fatal(err)
		}
		late := ledger.Uptime{BootID: "boot-1", UptimeSeconds: 1, At: clk.Now().Add(-10 * time.Minute)}
		if _, err := lc.ReportUptime(ctx, ln.ID, late); err == nil || !strings.Contains(err.Error(), "HTTP 400") {
			t.Errorf("a late report not marked queued = %v, want HTTP 400", err)
		}
		for _, at := range []time.Time{clk.Now().Add(-ledger.MaxQueuedAge - time.Hour), clk.Now().Add(3 * time.Minute)} {
			if _, err := lc.ReportUptime(ctx, ln.ID, ledger.Uptime{BootID: "boot-1", At: at, Queued: true}); err == nil || !strings.Contains(err.Error(), "HTTP 400") {
				t.Errorf("a queued report at %s = %v, want HTTP 400", at, err)
			}
		}
		late.Queued = true
		if rep, err := lc.ReportUptime(ctx, ln.ID, late); err != nil || rep.Boots != 1 {
			t.Errorf("a queued report = %+v, %v; want taken", rep, err)
		}
		if _, err := lc.ReportUptime(ctx, ln.ID, late); err == nil || !strings.Contains(err.Error(), "HTTP 409") {
			t.Errorf("the queued report again = %v, want HTTP 409 (stale_report)", err)
		}
		if rep, err := lc.ReportUptime(ctx, ln.ID, ledger.Uptime{BootID: "boot-2", UptimeSeconds: 1, At: clk.Now()}); err != nil || !rep.Restarted || rep.Boots != 2 {
			t.Errorf("the report after it = %+v, %v; want a second boot", rep, err)
		}
	})
}

// TestUsers_RotateAndDisable: rotation adds the new key and revokes the
// old; a disabled user's keys stop counting; every write is audited.
func TestUsers_RotateAndDisable(t *testing.T) {
	bothStores(t, func(t *testing.T, kind string) {
		ctx := context.Background()
		f := newFixtureOn(t, kind, nil)
		alice := f.user(t, "alice", map[string]string{"local": ledger.RoleDeployer})
		next, _ := keys.Generate("alice-2")
		u, err := f.client.RotateKey(ctx, "alice", alice.ID, next.AuthorizedKey())
		if err != nil || len(u.Keys) != 2 {
			t.Fatalf("RotateKey = %+v, %v", u, err)
		}
		for _, k := range u.Keys {
			if (k.ID == alice.ID) != (k.RevokedAt != nil) {
				t.Errorf("key %s revoked=%v after rotation", k.ID, k.RevokedAt != nil)
			}
		}
		if u, err := f.client.SetDisabled(ctx, "alice", true); err != nil || !u.Disabled {
			t.Errorf("disable = %+v, %v", u, err)
		}
		tr, _ := f.client.Trust(ctx, "local")
		for _, sg := range tr.Signers {
			if sg.User == "alice" && !sg.Disabled {
				t.Errorf("signer %s of a disabled user not flagged", sg.KeyID)
			}
		}
		entries, _ := f.client.Audit(ctx)
		var ops []string
		for _, e := range entries {
			ops = append(ops, e.Actor+":"+e.Op)
		}
		if got := strings.Join(ops, ","); got != "root:disable_user,root:rotate_key,root:create_user" {
			t.Errorf("audit = %s", got)
		}
	})
}

func ioNopCloser(b []byte) io.ReadCloser { return io.NopCloser(bytes.NewReader(b)) }

// TestNodes_TokenUsesAndRevocation: a token enrolls at most its uses (a
// registered node registering again uses none, and needs no token); a
// revoked node may neither register nor report, and lists as revoked.
func TestNodes_TokenUsesAndRevocation(t *testing.T) {
	bothStores(t, func(t *testing.T, kind string) {
		ctx := context.Background()
		f := newFixtureOn(t, kind, nil)
		tok, err := f.client.CreateTokenFor(ctx, "local", ledger.CreateTokenRequest{Uses: 2})
		if err != nil || tok.MaxUses != 2 || tok.ExpiresAt.Sub(tok.CreatedAt) != ledger.DefaultTokenTTL {
			t.Fatalf("token = %+v, %v", tok, err)
		}
		if one, _ := f.client.CreateToken(ctx, "local", 0); one.MaxUses != 1 {
			t.Errorf("a token's default uses = %d, want 1", one.MaxUses)
		}
		if _, err := f.client.CreateTokenFor(ctx, "local", ledger.CreateTokenRequest{Uses: ledger.MaxTokenUses + 1}); err == nil {
			t.Error("a token with too many uses was made")
		}
		register := func(k *keys.Key, secret string) (*ledger.Node, error) {
			return ledger.NodeClient(f.url, k, nil).Register(ctx, ledger.RegisterRequest{Site: "local", Token: secret, PublicKey: k.AuthorizedKey()})
		}
		a, _ := keys.Generate("a")
		b, _ := keys.Generate("b")
		c, _ := keys.Generate("c")
		na, err := register(a, tok.Secret)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := register(a, "no-token-needed"); err != nil {
			t.Errorf("a registered node registering again without a token: %v", err)
		}
		if _, err := register(b, tok.Secret); err != nil {
			t.Fatal(err)
		}
		if _, err := register(c, tok.Secret); err == nil || !strings.Contains(err.Error(), "used up") {
			t.Errorf("a third node on a two-use token = %v, want used up", err)
		}
		if list, _ := f.client.Tokens(ctx, "local"); list[len(list)-1].Uses != 2 {
			t.Errorf("tokens = %+v", list)
		}
		if _, err := ledger.NodeClient(f.url, a, nil).ReportUptime(ctx, na.ID, ledger.Uptime{BootID: "b", At: time.Now()}); err != nil {
			t.Fatal(err)
		}
		if n, err := f.client.RevokeNode(ctx, na.ID); err != nil || n.Liveness != ledger.LivenessRevoked || n.RevokedAt == nil {
			t.Fatalf("RevokeNode = %+v, %v", n, err)
		}
		if _, err := ledger.NodeClient(f.url, a, nil).ReportUptime(ctx, na.ID, ledger.Uptime{BootID: "b", At: time.Now()}); err == nil || !strings.Contains(err.Error(), "revoked") {
			t.Errorf("a revoked node's report = %v, want refused", err)
		}
		fresh, _ := f.client.CreateToken(ctx, "local", 0)
		if _, err := register(a, fresh.Secret); err == nil || !strings.Contains(err.Error(), "revoked") {
			t.Errorf("a revoked node registering again = %v, want refused", err)
		}
		if n, _ := f.client.Node(ctx, na.ID); n.Liveness != ledger.LivenessRevoked {
			t.Errorf("revoked node lists as %s", n.Liveness)
		}
	})
}

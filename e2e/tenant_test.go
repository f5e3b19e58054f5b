package e2e

import (
	"context"
	"encoding/json"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
)

// TestFleet_Tenants: two deployers on one node, alice and bob, each make a
// volume "data" and a network "net"; the names do not collide, each sees
// and changes only its own, and the site admin sees both and acts for one
// by naming it. The site's script memory cap (32 MiB) holds on its node.
func TestFleet_Tenants(t *testing.T) {
	slow(t)
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, "mkfs.btrfs")
	t.Parallel()
	f := newFleet(t)
	// The site caps a script's memory below the runner's own cap.
	site, err := f.lc.Site(context.Background(), "local")
	if err != nil {
		t.Fatal(err)
	}
	site.ScriptMemory = 32 << 20
	if err := f.lc.PutSite(context.Background(), *site); err != nil {
		t.Fatal(err)
	}
	alice := f.addUser("alice", map[string]string{"local": "deployer"})
	bob := f.addUser("bob", map[string]string{"local": "deployer"})
	f.startSupervisor("local")
	f.startCoord()
	poolDir, mnt := tempPool(t)
	node := testenv.HostNS(t)
	f.start("runner:t1", "runner", "--no-vm", "--site", "local", "--node", "t1", "--redis", f.redis, "--ledger", f.ledger, "--listen", "",
		"--pool-file", filepath.Join(poolDir, "pool.img"), "--pool-size", "1G", "--pool-mount", mnt,
		"--net-ns", testenv.NetNSPath(node), "--net-state", filepath.Join(f.dir, "net"))

	ctx := context.Background()
	run := func(k *keys.Key, script string) *job.Record {
		t.Helper()
		j := envelope.NewJob("tenant", `job := import("job"); storage := import("storage"); net := import("net")
must := func(what, v) { if is_error(v) { job.fail(what + ": " + string(v.value)) }; return v }
`+script, "local", time.Now())
		rep, err := f.client().Submit(ctx, rawEnvelope(t, j, k))
		if err != nil {
			t.Fatal(err)
		}
		return f.waitJob(rep.ID, time.Minute)
	}
	ok := func(k *keys.Key, script string) string {
		t.Helper()
		j := run(k, script)
		if j.State != job.StateSucceeded {
			t.Fatalf("%s: %s %s %s", script, j.State, j.Reason, j.Error)
		}
		return string(j.Result)
	}
	// The same names, two tenants.
	ok(alice, `must("v", storage.volume("data", "64M")); must("w", storage.write("data", "who", "alice")); must("n", net.network("net", "10.61.0.0/24"))`)
	ok(bob, `must("v", storage.volume("data", "64M")); must("w", storage.write("data", "who", "bob")); must("n", net.network("net", "10.62.0.0/24"))`)
	if got := ok(alice, `job.result(must("r", storage.read("data", "who")))`); got != `"alice"` {
		t.Errorf("alice reads her data: %s", got)
	}
	if got := ok(bob, `job.result(must("r", storage.read("data", "who")))`); got != `"bob"` {
		t.Errorf("bob reads his data: %s", got)
	}
	type owned struct{ Name, Owner string }
	list := func(k *keys.Key) (vols, nets []string) {
		t.Helper()
		var res struct{ Vols, Nets []owned }
		json.Unmarshal([]byte(ok(k, `job.result({vols: must("l", storage.volumes()), nets: must("n", net.networks())})`)), &res)
		for _, v := range res.Vols {
			vols = append(vols, v.Name+"@"+v.Owner)
		}
		for _, n := range res.Nets {
			nets = append(nets, n.Name+"@"+n.Owner)
		}
		sort.Strings(vols)
		sort.Strings(nets)
		return vols, nets
	}
	for _, tc := range []struct {
		who        string
		k          *keys.Key
		vols, nets string
	}{
		{"alice", alice, "data@alice", "net@alice"},
		{"bob", bob, "data@bob", "net@bob"},
		{"admin", f.admin, "alice/data@alice bob/data@bob", "alice/net@alice bob/net@bob"},
	} {
		vols, nets := list(tc.k)
		if strings.Join(vols, " ") != tc.vols || strings.Join(nets, " ") != tc.nets {
			t.Errorf("%s sees volumes %v and networks %v; want %s and %s", tc.who, vols, nets, tc.vols, tc.nets)
		}
	}
	// Bob cannot touch alice's, by any name.
	for _, script := range []string{
		`must("r", storage.read("alice/data", "who"))`,
		`must("d", storage.delete_volume("alice/data"))`,
		`must("d", net.delete_network("alice/net"))`,
		`must("r", storage.read("5alice.data", "who"))`,
	} {
		if j := run(bob, script); j.State != job.StateFailed {
			t.Errorf("bob: %s = %s %s", script, j.State, j.Result)
		}
	}
	// Bob deletes his own; alice's stays. The admin acts for alice by name.
	ok(bob, `must("d", storage.delete_volume("data")); must("n", net.delete_network("net"))`)
	if got := ok(f.admin, `job.result(must("r", storage.read("alice/data", "who")))`); got != `"alice"` {
		t.Errorf("the admin reads alice/data: %s", got)
	}
	if vols, nets := list(f.admin); strings.Join(vols, " ") != "alice/data@alice" || strings.Join(nets, " ") != "alice/net@alice" {
		t.Errorf("after bob's deletes the admin sees %v and %v", vols, nets)
	}
	grow := run(alice, `text := import("text"); a := []; for { a = append(a, text.repeat("x", 100000) + string(len(a))) }`)
	if grow.Reason != "memory_limit" || !strings.Contains(grow.Error, "32 MiB") {
		t.Errorf("a script over the site's cap: %s %s %q, want memory_limit at 32 MiB", grow.State, grow.Reason, grow.Error)
	}
}

package e2e

import (
	"context"
	"encoding/json"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/sal/network"
)

// TestFleet_NetworkScript: a signed network.tengo submitted with writ run
// makes a network with a port forward on a runner that manages a
// throwaway namespace (the "node"). A guest on that network then serves
// TCP and is reached through the node's port from outside and from the
// node itself, and its own outbound traffic leaves masqueraded.
func TestFleet_NetworkScript(t *testing.T) {
	slow(t)
	testenv.RequireRoot(t)
	t.Parallel()
	node := testenv.HostNS(t)
	f := newFleet(t)
	f.startSupervisor("local")
	f.startCoord()
	f.start("runner:net", "runner", "--no-vm", "--site", "local", "--node", "net1", "--redis", f.redis, "--ledger", f.ledger,
		"--listen", "", "--net-ns", testenv.NetNSPath(node), "--net-state", filepath.Join(f.dir, "net"))

	var res struct {
		Bridge  string `json:"bridge"`
		Gateway string `json:"gateway"`
		Subnet  string `json:"subnet"`
		Address string `json:"address"`
	}
	for i := 0; i < 2; i++ { // the second run converges
		out, err := exec.Command(writBin, "run", "../scripts/lib/network.tengo", "--coord", f.coord,
			"--key", filepath.Join(f.dir, "admin.key"), "--site", "local",
			"--arg", "name=shop", "--arg", "subnet=10.93.0.0/24", "--arg", "host_port=8080", "--arg", "port=80").Output()
		if err != nil {
			var stderr string
			if ee, ok := err.(*exec.ExitError); ok {
				stderr = string(ee.Stderr)
			}
			t.Fatalf("writ run network.tengo: %v\n%s", err, stderr)
		}
		if err := json.Unmarshal(out, &res); err != nil {
			t.Fatalf("result %s: %v", out, err)
		}
		if res.Address != "10.93.0.2" || res.Gateway != "10.93.0.1" {
			t.Fatalf("run %d: result = %s", i+1, out)
		}
	}

	addr := netip.MustParseAddr(res.Address)
	guest := testenv.PlugGuest(t, node, "vweb", res.Bridge, netip.PrefixFrom(addr, 24), netip.MustParseAddr(res.Gateway))
	testenv.Serve(t, guest, res.Address+":80", "web")
	outside := testenv.Uplink(t, node, "up0", netip.MustParsePrefix("192.0.2.1/24"), netip.MustParsePrefix("192.0.2.2/24"))
	testenv.Serve(t, outside, "192.0.2.2:9000", "outside")
	probe := func(what string, got string, err error, want string) {
		t.Helper()
		if err != nil || got != want {
			t.Errorf("%s = %q, %v; want %q", what, got, err, want)
		}
	}
	got, err := testenv.Probe(t, outside, "192.0.2.1:8080")
	probe("outside → node:8080", got, err, "web sees 192.0.2.2")
	got, err = testenv.Probe(t, node, "192.0.2.1:8080")
	probe("node → node:8080", got, err, "web sees 192.0.2.1")
	got, err = testenv.Probe(t, guest, "192.0.2.2:9000")
	probe("guest → outside", got, err, "outside sees 192.0.2.1")
}

// TestDev_Network: writ dev as root manages networks out of the box; here
// in a throwaway namespace, with the network sample as its job.
func TestDev_Network(t *testing.T) {
	testenv.RequireRoot(t)
	t.Parallel()
	node := testenv.HostNS(t)
	dir := t.TempDir()
	cmd := exec.Command(writBin, "dev", "--dir", filepath.Join(dir, "dev"), "--base-port", "0", "--no-pool",
		"--net-ns", testenv.NetNSPath(node), "--sample", "../scripts/lib/network.tengo",
		"--arg", "name=devnet", "--arg", "host_port=8081", "--exit-after-sample")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("writ dev: %v\n%s", err, out)
	}
	for _, want := range []string{`"network": "devnet"`, `"address": "10.88.0.2"`, `"host_port": 8081`} {
		if !strings.Contains(string(out), want) {
			t.Errorf("writ dev output lacks %q:\n%s", want, out)
		}
	}
	var rules string
	testenv.InNetNS(t, node, func() error {
		h, err := network.New(network.Config{StateDir: filepath.Join(dir, "dev", "net")})
		if err == nil {
			rules, err = h.Ruleset(context.Background())
		}
		return err
	})
	if !strings.Contains(rules, "net/3dev.devnet: forward tcp 8081 -> 10.88.0.2:80") {
		t.Errorf("the node's ruleset lacks the forward:\n%s", rules)
	}
}

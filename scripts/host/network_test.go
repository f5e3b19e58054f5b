package host

import (
	"context"
	"encoding/json"
	"errors"
	"github.com/writ-fleet/writ/scripts"
	"os"
	"strings"
	"testing"

	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/sal/network"
)

// TestNetworkModule_NetworkScript runs scripts/lib/network.tengo against a
// real network Host inside a throwaway network namespace.
func TestNetworkModule_NetworkScript(t *testing.T) {
	ns := testenv.HostNS(t)
	src, err := os.ReadFile("../lib/network.tengo")
	if err != nil {
		t.Fatal(err)
	}
	h, err := network.New(network.Config{StateDir: t.TempDir(), NetNS: testenv.NetNSPath(ns)})
	if err != nil {
		t.Fatal(err)
	}
	e := scripts.New(scripts.Config{}, Modules(Layers{Network: h}))
	// Scripts run on goroutines of their own: the Host enters the test's
	// namespace itself for every change.
	run := func(args string) (scripts.Output, error) {
		return e.Run(context.Background(), string(src), scripts.Input{JobID: "j", Owner: "alice", Args: []byte(args)})
	}
	var res struct {
		Network  string `json:"network"`
		Gateway  string `json:"gateway"`
		Address  string `json:"address"`
		Forwards []struct {
			Proto    string `json:"proto"`
			HostPort int    `json:"host_port"`
			Addr     string `json:"addr"`
			Port     int    `json:"port"`
		} `json:"forwards"`
	}
	for i := 0; i < 2; i++ { // the second run converges
		out, err := run(`{"name":"shop","subnet":"10.90.0.0/24","host_port":"8080","port":80}`)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(out.Result, &res); err != nil {
			t.Fatalf("result %s: %v", out.Result, err)
		}
		if res.Network != "shop" || res.Gateway != "10.90.0.1" || res.Address != "10.90.0.2" || len(res.Forwards) != 1 || res.Forwards[0].HostPort != 8080 || res.Forwards[0].Addr != "10.90.0.2" {
			t.Errorf("run %d: result = %s", i+1, out.Result)
		}
	}
	rules, _ := h.Ruleset(context.Background())
	if !strings.Contains(rules, "net/5alice.shop: forward tcp 8080 -> 10.90.0.2:80") {
		t.Errorf("ruleset lacks the forward:\n%s", rules)
	}
	for _, tc := range []struct{ args, want string }{
		{`{}`, "args.name is required"},
		{`{"name":"Bad Name"}`, "invalid name"},
		{`{"name":"other","subnet":"10.90.0.0/25"}`, "overlaps network"},
		{`{"name":"shop","subnet":"not-a-subnet"}`, "want an IPv4 prefix"},
		{`{"name":"shop","subnet":"10.90.0.0/24","owner":"b","host_port":"8080"}`, "already forwards"},
		{`{"name":"shop","subnet":"10.90.0.0/24","host_port":"70000"}`, "not a port number"},
	} {
		if _, err := run(tc.args); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("network.tengo %s = %v, want an error mentioning %q", tc.args, err, tc.want)
		}
	}
}

func TestNetworkModule_NoNetwork(t *testing.T) {
	// A runner without the layer cannot run the job at all: the run stops
	// with scripts.ErrTransient, so the job is retried (elsewhere, or later).
	e := scripts.New(scripts.Config{}, Modules(Layers{}))
	_, err := e.Run(context.Background(), `net := import("net"); job := import("job"); v := net.networks(); job.result("went on")`, scripts.Input{})
	if !errors.Is(err, scripts.ErrTransient) || !strings.Contains(err.Error(), "no network layer") {
		t.Fatalf("scripts.Run = %v, want scripts.ErrTransient naming the missing layer", err)
	}
}

package network

import (
	"context"
	"fmt"
	"net/netip"
	"testing"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"

	"github.com/writ-fleet/writ/internal/testenv"
)

// TestFirewall_Connectivity proves the rules with traffic: guests are
// network namespaces plugged into writ bridges, "outside" is a namespace
// behind an uplink, and TCP servers report the source address they see.
func TestFirewall_Connectivity(t *testing.T) {
	host := testenv.EnterHostNS(t)
	ctx := context.Background()
	h := newHost(t)
	alpha := mustNetwork(t, h, "alpha", "10.61.0.0/24")
	beta := mustNetwork(t, h, "beta", "10.62.0.0/24")
	// The outside routes writ's subnets through the host, so only writ's
	// rules can keep it out of them.
	outside := testenv.Uplink(t, host, "up0", netip.MustParsePrefix("192.0.2.1/24"), netip.MustParsePrefix("192.0.2.2/24"), netip.MustParsePrefix("10.0.0.0/8"))

	guest := func(name string, n Network) (netns.NsHandle, netip.Addr) {
		addr, err := h.Allocate(ctx, n.Name, name)
		if err != nil {
			t.Fatal(err)
		}
		ns := testenv.PlugGuest(t, host, "v"+name, n.Bridge, netip.PrefixFrom(addr, n.Subnet.Bits()), n.Gateway)
		testenv.Serve(t, ns, netip.AddrPortFrom(addr, 80).String(), name)
		return ns, addr
	}
	a1, a1addr := guest("a1", alpha)
	a2, a2addr := guest("a2", alpha)
	b1, b1addr := guest("b1", beta)
	testenv.Serve(t, outside, "192.0.2.2:9000", "outside")
	testenv.Serve(t, host, "10.61.0.1:7000", "gateway")

	type probe struct {
		name string
		from netns.NsHandle
		to   string
		want string // "" means the connection must fail
	}
	check := func(probes []probe) {
		t.Helper()
		for _, p := range probes {
			got, err := testenv.Probe(t, p.from, p.to)
			switch {
			case p.want == "" && err == nil:
				t.Errorf("%s: connected to %s (%q), want blocked", p.name, p.to, got)
			case p.want != "" && err != nil:
				t.Errorf("%s: %s: %v, want %q", p.name, p.to, err, p.want)
			case p.want != "" && got != p.want:
				t.Errorf("%s: %s answered %q, want %q", p.name, p.to, got, p.want)
			}
		}
	}
	a1port := netip.AddrPortFrom(a1addr, 80).String()
	check([]probe{
		{"within a network", a2, a1port, "a1 sees " + a2addr.String()},
		{"guest to gateway", a1, "10.61.0.1:7000", "gateway sees " + a1addr.String()},
		{"across networks", b1, a1port, ""},
		{"across networks, other way", a1, netip.AddrPortFrom(b1addr, 80).String(), ""},
		{"outside into a network", outside, a1port, ""},
		{"guest to outside is masqueraded", a1, "192.0.2.2:9000", "outside sees 192.0.2.1"},
		{"no forward yet", outside, "192.0.2.1:8080", ""},
	})

	if _, err := h.AddForward(ctx, "alpha", Forward{Proto: "tcp", HostPort: 8080, Addr: a1addr, Port: 80}); err != nil {
		t.Fatal(err)
	}
	check([]probe{
		{"forward from outside", outside, "192.0.2.1:8080", "a1 sees 192.0.2.2"},
		{"forward from the host", host, "192.0.2.1:8080", "a1 sees 192.0.2.1"},
		{"forward by hairpin", a2, "192.0.2.1:8080", "a1 sees 10.61.0.1"},
		{"forward from another network", b1, "192.0.2.1:8080", "a1 sees 10.61.0.1"},
		{"still no way in directly", outside, a1port, ""},
	})

	if err := h.RemoveForward(ctx, "alpha", "tcp", 8080); err != nil {
		t.Fatal(err)
	}
	check([]probe{{"forward removed", outside, "192.0.2.1:8080", ""}})
}

// TestFirewall_Golden checks the ruleset the kernel holds against golden
// files, that applying it again sends nothing (the rule handles stay),
// that deleting a network removes exactly its rules, and that other
// tables are never touched.
func TestFirewall_Golden(t *testing.T) {
	testenv.EnterHostNS(t)
	ctx := context.Background()

	// A foreign table, as another firewall manager would leave it.
	c, _ := nftables.New()
	other := c.AddTable(&nftables.Table{Name: "other", Family: nftables.TableFamilyINet})
	c.AddChain(&nftables.Chain{Name: "input", Table: other, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter})
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}

	h := newHost(t)
	mustNetwork(t, h, "alpha", "10.61.0.0/24")
	if _, err := h.AddForward(ctx, "alpha", Forward{Proto: "tcp", HostPort: 8080, Addr: netip.MustParseAddr("10.61.0.2"), Port: 80}); err != nil {
		t.Fatal(err)
	}
	alphaOnly, _ := h.Ruleset(ctx)
	if _, err := h.EnsureNetwork(ctx, Spec{Name: "beta", Subnet: netip.MustParsePrefix("10.62.0.0/24"), Prefix6: netip.MustParsePrefix("fd00:62::/64")}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.AddForward(ctx, "beta", Forward{Proto: "udp", HostPort: 5353, Addr: netip.MustParseAddr("10.62.0.9"), Port: 53}); err != nil {
		t.Fatal(err)
	}
	both, err := h.Ruleset(ctx)
	if err != nil {
		t.Fatal(err)
	}
	testenv.Golden(t, "ruleset.golden", both)
	testenv.Golden(t, "ruleset-alpha.golden", alphaOnly)

	handles := func() []uint64 {
		var out []uint64
		chains, _ := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
		for _, ch := range chains {
			if ch.Table.Name == TableName {
				rules, _ := c.GetRules(writTable, ch)
				for _, r := range rules {
					out = append(out, r.Handle)
				}
			}
		}
		return out
	}
	before := handles()
	if err := h.Restore(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := h.EnsureNetwork(ctx, Spec{Name: "alpha", Subnet: netip.MustParsePrefix("10.61.0.0/24")}); err != nil {
		t.Fatal(err)
	}
	if after := handles(); len(before) == 0 || fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("rule handles changed by a second apply: %v, then %v", before, after)
	}

	if err := h.DeleteNetwork(ctx, "beta"); err != nil {
		t.Fatal(err)
	}
	if got, _ := h.Ruleset(ctx); got != alphaOnly {
		t.Errorf("after deleting beta the ruleset is\n%s\nwant alpha's alone:\n%s", got, alphaOnly)
	}
	if err := h.DeleteNetwork(ctx, "alpha"); err != nil {
		t.Fatal(err)
	}
	if got := mustRuleset(t, h); got != "" {
		t.Errorf("after the last network went the ruleset is\n%s\nwant none", got)
	}
	if _, err := c.ListTableOfFamily(TableName, nftables.TableFamilyINet); err == nil {
		t.Errorf("table inet %s is left behind, empty, after its last network went", TableName)
	}
	if _, err := c.ListTableOfFamily("other", nftables.TableFamilyINet); err != nil {
		t.Errorf("the foreign table is gone: %v", err)
	}
	if ch, err := c.ListChain(other, "input"); err != nil || ch == nil {
		t.Errorf("the foreign table's chain is gone: %v", err)
	}
}

func mustRuleset(t *testing.T, h *Host) string {
	t.Helper()
	s, err := h.Ruleset(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

package network

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/writ-fleet/writ/internal/testenv"
)

func newHost(t *testing.T) *Host {
	t.Helper()
	h, err := New(Config{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func mustNetwork(t *testing.T, h *Host, name, subnet string) Network {
	t.Helper()
	n, err := h.EnsureNetwork(context.Background(), Spec{Name: name, Subnet: netip.MustParsePrefix(subnet)})
	if err != nil {
		t.Fatalf("EnsureNetwork(%s, %s): %v", name, subnet, err)
	}
	return n
}

func TestHost_NetworksAndTaps(t *testing.T) {
	testenv.EnterHostNS(t)
	ctx := context.Background()
	h := newHost(t)
	var n Network
	for i := 0; i < 2; i++ { // idempotent
		n = mustNetwork(t, h, "tenant-a", "10.42.0.0/24")
	}
	br, err := netlink.LinkByName(n.Bridge)
	if err != nil {
		t.Fatal(err)
	}
	if br.Type() != "bridge" || br.Attrs().Flags&1 == 0 {
		t.Errorf("bridge %s: type %s flags %v", n.Bridge, br.Type(), br.Attrs().Flags)
	}
	addrs, _ := netlink.AddrList(br, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IPNet.String() != "10.42.0.1/24" {
		t.Errorf("bridge addresses = %v, want 10.42.0.1/24 once", addrs)
	}
	var nic NIC
	for i := 0; i < 2; i++ {
		if nic, err = h.Attach(ctx, "tenant-a", "vm1", 0); err != nil {
			t.Fatal(err)
		}
	}
	link, err := netlink.LinkByName(nic.Tap)
	if err != nil {
		t.Fatal(err)
	}
	if link.Attrs().MasterIndex != br.Attrs().Index || nic.MAC != MAC("vm1", 0).String() || nic.Addr != netip.MustParseAddr("10.42.0.2") {
		t.Errorf("NIC %+v: tap master %d (bridge %d)", nic, link.Attrs().MasterIndex, br.Attrs().Index)
	}
	if got := link.Attrs().HardwareAddr; got[0] != 0xfe || got.String() == nic.MAC {
		t.Errorf("tap MAC = %s, want the guest's (%s) with 0xfe first", got, nic.MAC)
	}

	// Refusals.
	for _, tc := range []struct {
		name string
		spec Spec
		want error
	}{
		{"other subnet", Spec{Name: "tenant-a", Subnet: netip.MustParsePrefix("10.43.0.0/24")}, ErrConflict},
		{"overlap", Spec{Name: "tenant-b", Subnet: netip.MustParsePrefix("10.42.0.128/25")}, ErrConflict},
		{"bad name", Spec{Name: "Tenant B", Subnet: netip.MustParsePrefix("10.44.0.0/24")}, ErrInvalidName},
		{"ipv6 subnet", Spec{Name: "six", Subnet: netip.MustParsePrefix("fd00::/64")}, ErrInvalid},
		{"tiny subnet", Spec{Name: "tiny", Subnet: netip.MustParsePrefix("10.45.0.0/31")}, ErrInvalid},
	} {
		if _, err := h.EnsureNetwork(ctx, tc.spec); !errors.Is(err, tc.want) {
			t.Errorf("%s: EnsureNetwork(%+v) = %v, want %v", tc.name, tc.spec, err, tc.want)
		}
	}
	// A foreign interface with our name is never taken over, and the
	// refused network leaves no state.
	if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: BridgeName("tenant-b")}}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.EnsureNetwork(ctx, Spec{Name: "tenant-b", Subnet: netip.MustParsePrefix("10.43.0.0/24")}); !errors.Is(err, ErrConflict) {
		t.Errorf("EnsureNetwork over a foreign interface = %v, want ErrConflict", err)
	}
	if nets, _ := h.Networks(ctx); len(nets) != 1 {
		t.Errorf("networks after refusals = %+v, want tenant-a only", nets)
	}

	// A network with a tap attached is not deleted.
	if err := h.DeleteNetwork(ctx, "tenant-a"); !errors.Is(err, ErrInUse) {
		t.Errorf("DeleteNetwork with a tap attached = %v, want ErrInUse", err)
	}
	for i := 0; i < 2; i++ { // detach and delete, twice
		if err := h.Detach(ctx, "tenant-a", "vm1", 0); err != nil {
			t.Error(err)
		}
		if err := h.DeleteNetwork(ctx, "tenant-a"); err != nil {
			t.Error(err)
		}
	}
	if _, err := netlink.LinkByName(n.Bridge); err == nil {
		t.Error("bridge still there after DeleteNetwork")
	}
	if _, err := netlink.LinkByName(nic.Tap); err == nil {
		t.Error("tap still there after Detach")
	}
	if _, err := h.Network(ctx, "tenant-a"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Network after delete = %v, want ErrNotFound", err)
	}
}

func TestHost_Forwards(t *testing.T) {
	testenv.EnterHostNS(t)
	ctx := context.Background()
	h := newHost(t)
	mustNetwork(t, h, "a", "10.50.0.0/24")
	mustNetwork(t, h, "b", "10.51.0.0/24")
	fwd := Forward{Proto: "tcp", HostPort: 8080, Addr: netip.MustParseAddr("10.50.0.2"), Port: 80}
	for i := 0; i < 2; i++ {
		n, err := h.AddForward(ctx, "a", fwd)
		if err != nil || len(n.Forwards) != 1 {
			t.Fatalf("AddForward = %+v, %v", n, err)
		}
	}
	for _, tc := range []struct {
		name    string
		network string
		f       Forward
		want    error
	}{
		{"port taken by another network", "b", Forward{Proto: "tcp", HostPort: 8080, Addr: netip.MustParseAddr("10.51.0.2"), Port: 80}, ErrConflict},
		{"port taken, other target", "a", Forward{Proto: "tcp", HostPort: 8080, Addr: netip.MustParseAddr("10.50.0.3"), Port: 80}, ErrConflict},
		{"address outside the network", "a", Forward{Proto: "tcp", HostPort: 8081, Addr: netip.MustParseAddr("10.51.0.2"), Port: 80}, ErrInvalid},
		{"the gateway", "a", Forward{Proto: "tcp", HostPort: 8081, Addr: netip.MustParseAddr("10.50.0.1"), Port: 80}, ErrInvalid},
		{"protocol", "a", Forward{Proto: "icmp", HostPort: 8081, Addr: netip.MustParseAddr("10.50.0.2"), Port: 80}, ErrInvalid},
		{"port zero", "a", Forward{Proto: "udp", HostPort: 0, Addr: netip.MustParseAddr("10.50.0.2"), Port: 80}, ErrInvalid},
		{"no such network", "c", Forward{Proto: "udp", HostPort: 53, Addr: netip.MustParseAddr("10.50.0.2"), Port: 53}, ErrNotFound},
	} {
		if _, err := h.AddForward(ctx, tc.network, tc.f); !errors.Is(err, tc.want) {
			t.Errorf("%s: AddForward(%s, %s) = %v, want %v", tc.name, tc.network, tc.f, err, tc.want)
		}
	}
	// udp on the same port is another forward.
	if _, err := h.AddForward(ctx, "b", Forward{Proto: "udp", HostPort: 8080, Addr: netip.MustParseAddr("10.51.0.2"), Port: 53}); err != nil {
		t.Error(err)
	}
	// Releasing an address drops the forwards to it.
	if addr, err := h.Allocate(ctx, "a", "web"); err != nil || addr != fwd.Addr {
		t.Fatalf("Allocate = %s, %v; want %s", addr, err, fwd.Addr)
	}
	if err := h.Release(ctx, "a", "web"); err != nil {
		t.Fatal(err)
	}
	if n, _ := h.Network(ctx, "a"); len(n.Forwards) != 0 {
		t.Errorf("forwards after releasing their address = %+v", n.Forwards)
	}
	if err := h.RemoveForward(ctx, "b", "udp", 8080); err != nil {
		t.Error(err)
	}
	if err := h.RemoveForward(ctx, "b", "udp", 8080); err != nil {
		t.Error(err)
	}
	if n, _ := h.Network(ctx, "b"); len(n.Forwards) != 0 {
		t.Errorf("forwards after RemoveForward = %+v", n.Forwards)
	}
}

// TestHost_Restore: after a reboot (no bridges, no table) Restore brings
// back the same networks and the same ruleset, and addresses keep their
// owners.
func TestHost_Restore(t *testing.T) {
	testenv.EnterHostNS(t)
	ctx := context.Background()
	dir := t.TempDir()
	h, _ := New(Config{StateDir: dir})
	n := mustNetwork(t, h, "web", "10.70.0.0/24")
	a1, _ := h.Allocate(ctx, "web", "one")
	if _, err := h.AddForward(ctx, "web", Forward{Proto: "tcp", HostPort: 2222, Addr: a1, Port: 22}); err != nil {
		t.Fatal(err)
	}
	nic, err := h.Attach(ctx, "web", "vm1", 0)
	if err != nil {
		t.Fatal(err)
	}
	before, _ := h.Ruleset(ctx)

	// "Reboot": the kernel forgets; only the state directory is left.
	br, _ := netlink.LinkByName(n.Bridge)
	netlink.LinkDel(br)
	if tap, err := netlink.LinkByName(nic.Tap); err == nil {
		netlink.LinkDel(tap)
	}
	if err := applyFirewall(nil); err != nil {
		t.Fatal(err)
	}
	h2, _ := New(Config{StateDir: dir})
	for i := 0; i < 2; i++ {
		if err := h2.Restore(ctx); err != nil {
			t.Fatal(err)
		}
	}
	br, err = netlink.LinkByName(n.Bridge)
	if err != nil {
		t.Fatalf("bridge not restored: %v", err)
	}
	// The VM's tap is back, on the bridge and up: its hypervisor can start.
	if tap, err := netlink.LinkByName(nic.Tap); err != nil || tap.Attrs().MasterIndex != br.Attrs().Index || tap.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("tap %s after Restore: %v, %v", nic.Tap, tap, err)
	}
	if after, _ := h2.Ruleset(ctx); after != before {
		t.Errorf("ruleset after Restore differs:\n%s\nwant\n%s", after, before)
	}
	a2, _ := h2.Allocate(ctx, "web", "two")
	if again, _ := h2.Allocate(ctx, "web", "one"); again != a1 || a2 == a1 {
		t.Errorf("after restart: one=%s two=%s, want one=%s and two different", again, a2, a1)
	}
}

type fakeOverlay map[string]netip.Prefix

func (f fakeOverlay) Prefix(_ context.Context, network string) (netip.Prefix, error) {
	return f[network], nil
}

// TestHost_Overlay: a network that names no IPv6 prefix gets the
// overlay's, with the first address on the bridge and a masquerade6 rule.
func TestHost_Overlay(t *testing.T) {
	testenv.EnterHostNS(t)
	ctx := context.Background()
	h, _ := New(Config{StateDir: t.TempDir(), Overlay: fakeOverlay{"ov": netip.MustParsePrefix("fd12:3456:789a:1::/64")}})
	n, err := h.EnsureNetwork(ctx, Spec{Name: "ov", Subnet: netip.MustParsePrefix("10.80.0.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	if n.Gateway6 != netip.MustParseAddr("fd12:3456:789a:1::1") {
		t.Errorf("Gateway6 = %s", n.Gateway6)
	}
	br, _ := netlink.LinkByName(n.Bridge)
	addrs, _ := netlink.AddrList(br, netlink.FAMILY_V6)
	found := false
	for _, a := range addrs {
		found = found || a.IP.String() == "fd12:3456:789a:1::1"
	}
	if !found {
		t.Errorf("bridge IPv6 addresses = %v, want fd12:3456:789a:1::1", addrs)
	}
	nic, err := h.Attach(ctx, "ov", "vm", 0)
	if err != nil {
		t.Fatal(err)
	}
	if !n.Prefix6.Contains(nic.Addr6) {
		t.Errorf("NIC address6 %s not in %s", nic.Addr6, n.Prefix6)
	}
}

package network

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/writ-fleet/writ/internal/testenv"
)

func TestHost_NetworksAndTaps(t *testing.T) {
	testenv.NetNS(t)
	h := &Host{StateDir: t.TempDir()}
	subnet := netip.MustParsePrefix("10.42.0.0/24")
	var n Network
	for i := 0; i < 2; i++ { // idempotent
		var err error
		if n, err = h.EnsureNetwork("tenant-a", subnet); err != nil {
			t.Fatal(err)
		}
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
	for i := 0; i < 2; i++ {
		tap, err := h.EnsureTap("vm1", 0, n)
		if err != nil {
			t.Fatal(err)
		}
		link, err := netlink.LinkByName(tap)
		if err != nil {
			t.Fatal(err)
		}
		if link.Attrs().MasterIndex != br.Attrs().Index || link.Attrs().HardwareAddr.String() != MAC("vm1", 0).String() {
			t.Errorf("tap %s: master %d (bridge %d), MAC %s", tap, link.Attrs().MasterIndex, br.Attrs().Index, link.Attrs().HardwareAddr)
		}
	}
	// A foreign interface with our name is never taken over.
	if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: BridgeName("tenant-b")}}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.EnsureNetwork("tenant-b", netip.MustParsePrefix("10.43.0.0/24")); err == nil || !strings.Contains(err.Error(), "not touching it") {
		t.Errorf("EnsureNetwork over a foreign interface = %v", err)
	}
	// Delete, twice.
	for i := 0; i < 2; i++ {
		if err := h.DeleteTap("vm1", 0); err != nil {
			t.Error(err)
		}
		if err := h.DeleteNetwork("tenant-a"); err != nil {
			t.Error(err)
		}
	}
	if _, err := netlink.LinkByName(n.Bridge); err == nil {
		t.Error("bridge still there after DeleteNetwork")
	}
}

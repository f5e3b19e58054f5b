package testenv

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// The shape of a host-like namespace (HostNS): what an ordinary machine
// has before writ touches it. Tests that make networks run in one, so a
// policy that only holds in a clean room fails here as it would on a
// user's machine.
var (
	// HostLAN is the uplink's subnet (eth0), HostAddr the host's address on
	// it and HostGateway the gateway its IPv4 default route goes through.
	HostLAN     = netip.MustParsePrefix("198.51.100.0/24")
	HostAddr    = netip.MustParseAddr("198.51.100.2")
	HostGateway = netip.MustParseAddr("198.51.100.1")
	// HostLAN6, HostAddr6 and HostGateway6: the same for IPv6 (a ULA /64).
	HostLAN6     = netip.MustParsePrefix("fd42:0:0:1::/64")
	HostAddr6    = netip.MustParseAddr("fd42:0:0:1::2")
	HostGateway6 = netip.MustParseAddr("fd42:0:0:1::1")
	// HostResolver is the LAN's DNS resolver (an address of the LAN side).
	HostResolver = netip.MustParseAddr("198.51.100.53")
	// HostDocker is a docker-like bridge (docker0) with its kernel route.
	HostDocker = netip.MustParsePrefix("172.17.0.1/16")
	// HostSecond is a second NIC (eth1) whose /16 lies inside writ's
	// default address pool, so a network there must be refused.
	HostSecond = netip.MustParsePrefix("10.250.0.5/16")
)

// HostNS makes a fresh network namespace shaped like an ordinary host and
// returns it without entering it: eth0, a veth to a LAN namespace, with
// HostAddr/24 and HostAddr6/64 and default routes for both families through
// the LAN's gateway (which also holds HostResolver); docker0, a bridge with
// HostDocker; and eth1 with HostSecond. Everything goes when the test ends.
func HostNS(t testing.TB) netns.NsHandle {
	t.Helper()
	host := NewNetNS(t)
	shapeHost(t, host)
	return host
}

// EnterHostNS is NetNS with the namespace shaped as HostNS shapes it: the
// test's goroutine, locked to its thread, runs in it until the test ends.
func EnterHostNS(t *testing.T) netns.NsHandle {
	t.Helper()
	host := NetNS(t)
	shapeHost(t, host)
	return host
}

func shapeHost(t testing.TB, host netns.NsHandle) {
	t.Helper()
	lan := NewNetNS(t)
	err := InNetNS(t, host, func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(lan))}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("eth0: %w", err)
		}
		if err := configure("eth0", netip.PrefixFrom(HostAddr, HostLAN.Bits()), HostGateway); err != nil {
			return err
		}
		if err := addAddr("eth0", netip.PrefixFrom(HostAddr6, HostLAN6.Bits())); err != nil {
			return err
		}
		eth0, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: HostGateway6.AsSlice()}); err != nil {
			return fmt.Errorf("IPv6 default route via %s: %w", HostGateway6, err)
		}
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "docker0"}}
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("docker0: %w", err)
		}
		if err := configure("docker0", HostDocker, netip.Addr{}); err != nil {
			return err
		}
		// A veth, not a dummy link: this kernel may lack the dummy module.
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth1"}, PeerName: "eth1", PeerNamespace: netlink.NsFd(int(lan))}); err != nil {
			return fmt.Errorf("eth1: %w", err)
		}
		return configure("eth1", HostSecond, netip.Addr{})
	})
	if err == nil {
		err = InNetNS(t, lan, func() error {
			if err := configure("eth0", netip.PrefixFrom(HostGateway, HostLAN.Bits()), netip.Addr{}); err != nil {
				return err
			}
			if err := addAddr("eth0", netip.PrefixFrom(HostResolver, HostLAN.Bits())); err != nil {
				return err
			}
			return addAddr("eth0", netip.PrefixFrom(HostGateway6, HostLAN6.Bits()))
		})
	}
	if err != nil {
		t.Fatalf("host-like namespace: %v", err)
	}
}

// addAddr puts one more address on ifname (no duplicate address detection,
// so an IPv6 one is usable at once).
func addAddr(ifname string, addr netip.Prefix) error {
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return err
	}
	ipn := &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), addr.Addr().BitLen())}
	if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: ipn, Flags: 0x02 /* IFA_F_NODAD */}); err != nil {
		return fmt.Errorf("address %s on %s: %w", addr, ifname, err)
	}
	return nil
}

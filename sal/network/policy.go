package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
)

// DefaultAddressPool is where networks may be made unless Config says
// otherwise: private IPv4 space, minus whatever the host already uses
// (checked per network).
var DefaultAddressPool = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}

// PortRange is an inclusive range of host ports.
type PortRange struct{ Min, Max uint16 }

// DefaultForwardPorts are the host ports forwards may take unless Config
// says otherwise: none of the well-known ones (ssh, DNS, …).
var DefaultForwardPorts = PortRange{Min: 1024, Max: 65535}

// ParsePortRange reads "1024-65535" or a single port.
func ParsePortRange(s string) (PortRange, error) {
	lo, hi, found := strings.Cut(s, "-")
	if !found {
		hi = lo
	}
	a, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
	b, err2 := strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
	if err1 != nil || err2 != nil || a == 0 || a > b {
		return PortRange{}, fmt.Errorf("port range %q: want MIN-MAX within 1-65535", s)
	}
	return PortRange{Min: uint16(a), Max: uint16(b)}, nil
}

func (r PortRange) contains(p uint16) bool { return p >= r.Min && p <= r.Max }

func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.Min, r.Max) }

// inPool reports whether subnet lies inside one of pool's prefixes.
func inPool(subnet netip.Prefix, pool []netip.Prefix) bool {
	for _, p := range pool {
		if p.Bits() <= subnet.Bits() && p.Contains(subnet.Addr()) {
			return true
		}
	}
	return false
}

// hostOverlap returns what of the namespace's own addressing (an address
// or a route not on a writ bridge) overlaps subnet, of subnet's family, or
// "". A default route (0.0.0.0/0 or ::/0, however netlink reports it: a nil
// Dst or a zero-length one) overlaps everything and so means nothing here;
// the node's addresses and its more specific routes do. Call it inside Do.
func hostOverlap(subnet netip.Prefix, bridge string) (string, error) {
	family := netlink.FAMILY_V4
	if subnet.Addr().Is6() {
		family = netlink.FAMILY_V6
	}
	links, err := netlink.LinkList()
	if err != nil {
		return "", fmt.Errorf("network: list links: %w", err)
	}
	names := map[int]string{}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	ours := func(idx int) bool { return names[idx] == bridge || isWritBridge(names[idx]) }
	addrs, err := netlink.AddrList(nil, family)
	if err != nil {
		return "", fmt.Errorf("network: list addresses: %w", err)
	}
	for _, a := range addrs {
		if ours(a.LinkIndex) {
			continue
		}
		if p, ok := hostPrefix(a.IPNet); ok && p.Masked().Overlaps(subnet) {
			return fmt.Sprintf("address %s on %s", p, names[a.LinkIndex]), nil
		}
	}
	routes, err := netlink.RouteList(nil, family)
	if err != nil {
		return "", fmt.Errorf("network: list routes: %w", err)
	}
	for _, r := range routes {
		if ours(r.LinkIndex) {
			continue
		}
		p, ok := hostPrefix(r.Dst)
		if !ok || p.Bits() == 0 {
			continue // a default route: see above
		}
		if p = p.Masked(); p.Overlaps(subnet) {
			return fmt.Sprintf("route %s via %s", p, names[r.LinkIndex]), nil
		}
	}
	return "", nil
}

// hostPrefix converts a netlink address or route destination to a prefix
// (an IPv4 one unmapped). It reports false for nil and malformed values.
func hostPrefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	ip := n.IP
	if v4 := ip.To4(); v4 != nil {
		ip = v4
	}
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, bits := n.Mask.Size()
	if bits != a.BitLen() {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, ones), true
}

// isWritBridge reports whether name is a bridge writ made (BridgeName).
func isWritBridge(name string) bool {
	return len(name) == 14 && strings.HasPrefix(name, "wb")
}

// portInUse reports whether a process of the namespace listens on port
// (proto tcp or udp): it tries to bind it. Call it inside Do.
func portInUse(proto string, port uint16) bool {
	addr := ":" + strconv.Itoa(int(port))
	if proto == "udp" {
		c, err := net.ListenPacket("udp", addr)
		if err != nil {
			return errors.Is(err, syscall.EADDRINUSE)
		}
		c.Close()
		return false
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return errors.Is(err, syscall.EADDRINUSE)
	}
	l.Close()
	return false
}

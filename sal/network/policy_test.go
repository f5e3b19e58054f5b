package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/writ-fleet/writ/internal/testenv"
)

// TestHost_Policy: networks stay inside the address pool and off the
// node's own addressing, forwards inside the port range and off ports a
// process listens on, and WaitTCP inside writ's networks.
func TestHost_Policy(t *testing.T) {
	testenv.EnterHostNS(t)
	ctx := context.Background()
	h, err := New(Config{StateDir: t.TempDir(), AddressPool: []netip.Prefix{netip.MustParsePrefix("10.60.0.0/16"), netip.MustParsePrefix("10.99.0.0/16")}, ForwardPorts: PortRange{Min: 8000, Max: 8999}})
	if err != nil {
		t.Fatal(err)
	}
	// The node's own side: an address on a plain link, as the node's LAN.
	lan := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "lan0"}, PeerName: "lan1"}
	if err := netlink.LinkAdd(lan); err != nil {
		t.Fatal(err)
	}
	addr, _ := netlink.ParseAddr("10.99.1.5/24")
	if err := netlink.AddrAdd(lan, addr); err != nil {
		t.Fatal(err)
	}
	netlink.LinkSetUp(lan)
	for i, tc := range []struct {
		subnet string
		want   error
	}{
		{"10.60.1.0/24", nil},
		{"10.61.0.0/24", ErrInvalid},  // outside the pool
		{"10.60.0.0/15", ErrInvalid},  // larger than any pool prefix
		{"10.99.1.0/24", ErrConflict}, // the node's own subnet
		{"10.99.0.0/16", ErrConflict}, // covers it
		{"10.99.2.0/24", nil},         // beside it
	} {
		_, err := h.EnsureNetwork(ctx, Spec{Name: fmt.Sprintf("t%d", i), Subnet: netip.MustParsePrefix(tc.subnet)})
		if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("EnsureNetwork(%s) = %v, want %v", tc.subnet, err, tc.want)
		}
	}
	n := mustNetwork(t, h, "web", "10.60.2.0/24")
	guest := n.Gateway.Next()
	for _, tc := range []struct {
		port uint16
		want error
	}{{8000, nil}, {8999, nil}, {22, ErrInvalid}, {7999, ErrInvalid}, {9000, ErrInvalid}} {
		_, err := h.AddForward(ctx, "web", Forward{Proto: "tcp", HostPort: tc.port, Addr: guest, Port: 80})
		if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("AddForward(host port %d) = %v, want %v", tc.port, err, tc.want)
		}
	}
	// A process of the node listens on 8500: no forward may take it.
	ln, err := net.Listen("tcp", ":8500")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if _, err := h.AddForward(ctx, "web", Forward{Proto: "tcp", HostPort: 8500, Addr: guest, Port: 80}); !errors.Is(err, ErrConflict) {
		t.Errorf("AddForward onto a listened port = %v, want ErrConflict", err)
	}
	// WaitTCP reaches only writ's networks.
	if err := h.WaitTCP(ctx, netip.MustParseAddr("127.0.0.1"), 8500, time.Second); !errors.Is(err, ErrInvalid) {
		t.Errorf("WaitTCP(127.0.0.1) = %v, want ErrInvalid", err)
	}
	if err := h.WaitTCP(ctx, netip.MustParseAddr("10.99.1.5"), 8500, time.Second); !errors.Is(err, ErrInvalid) {
		t.Errorf("WaitTCP(the node's LAN) = %v, want ErrInvalid", err)
	}
	if err := h.WaitTCP(ctx, n.Gateway, 8500, time.Second); !errors.Is(err, ErrInvalid) {
		t.Errorf("WaitTCP(a network's gateway, the node itself) = %v, want ErrInvalid", err)
	}
	if _, err := ParsePortRange("9000-8000"); err == nil {
		t.Error("ParsePortRange(9000-8000) = nil error")
	}
	if r, err := ParsePortRange("1024-65535"); err != nil || r != DefaultForwardPorts {
		t.Errorf("ParsePortRange(1024-65535) = %v, %v", r, err)
	}
}

// TestHost_PolicyOrdinaryHost: on a namespace shaped like a real host
// (default routes for both families, a docker bridge, a second NIC), the
// default routes overlap nothing, while the host's addresses and its more
// specific routes still do, for either family.
func TestHost_PolicyOrdinaryHost(t *testing.T) {
	testenv.EnterHostNS(t)
	ctx := context.Background()
	h, err := New(Config{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	for i, tc := range []struct {
		subnet string
		want   error
	}{
		{"10.89.0.0/24", nil},          // the README's network: only the default route covers it
		{"10.250.1.0/24", ErrConflict}, // inside the second NIC's /16
		{"10.250.0.0/16", ErrConflict}, // that /16 itself
		{"10.0.0.0/8", ErrConflict},    // the whole pool covers the second NIC
		{"172.17.1.0/24", ErrInvalid},  // docker's bridge: outside the pool anyway
	} {
		_, err := h.EnsureNetwork(ctx, Spec{Name: fmt.Sprintf("o%d", i), Subnet: netip.MustParsePrefix(tc.subnet)})
		if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("EnsureNetwork(%s) = %v, want %v", tc.subnet, err, tc.want)
		}
	}
	for _, tc := range []struct {
		subnet string
		clash  bool
	}{
		{"10.89.0.0/24", false},
		{"198.51.100.0/25", true}, // the LAN: the host's address
		{"172.17.5.0/24", true},   // docker0's address and route
		{"fd42:0:0:1::/64", true}, // the IPv6 LAN
		{"fd42::/48", true},       // covers it
		{"fd99:1::/64", false},    // only ::/0 covers it
	} {
		clash, err := hostOverlap(netip.MustParsePrefix(tc.subnet), "")
		if err != nil || (clash != "") != tc.clash {
			t.Errorf("hostOverlap(%s) = %q, %v, want a clash: %v", tc.subnet, clash, err, tc.clash)
		}
	}
}

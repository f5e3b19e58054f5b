package testenv

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// PlugGuest makes a "guest": a fresh network namespace joined by a veth
// pair to bridge in namespace host, with addr on its eth0 and a default
// route through gw. hostIf names the host end. Everything goes when the
// test ends (the host end with the guest namespace).
func PlugGuest(t testing.TB, host netns.NsHandle, hostIf, bridge string, addr netip.Prefix, gw netip.Addr) netns.NsHandle {
	t.Helper()
	ns := NewNetNS(t)
	err := InNetNS(t, host, func() error {
		br, err := netlink.LinkByName(bridge)
		if err != nil {
			return fmt.Errorf("bridge %s: %w", bridge, err)
		}
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostIf, MasterIndex: br.Attrs().Index}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(ns))}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("veth: %w", err)
		}
		l, err := netlink.LinkByName(hostIf)
		if err == nil {
			err = netlink.LinkSetUp(l)
		}
		return err
	})
	if err == nil {
		err = InNetNS(t, ns, func() error { return configure("eth0", addr, gw) })
	}
	if err != nil {
		t.Fatalf("guest %s: %v", hostIf, err)
	}
	return ns
}

// Uplink makes an "outside" namespace joined to namespace host by a veth
// pair: hostAddr on the host end (hostIf), outsideAddr in the outside
// namespace, which routes only routes (and its own subnet) through the
// host.
func Uplink(t testing.TB, host netns.NsHandle, hostIf string, hostAddr, outsideAddr netip.Prefix, routes ...netip.Prefix) netns.NsHandle {
	t.Helper()
	ns := NewNetNS(t)
	err := InNetNS(t, host, func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostIf}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(ns))}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		return configure(hostIf, hostAddr, netip.Addr{})
	})
	if err != nil {
		t.Fatalf("uplink %s: %v", hostIf, err)
	}
	err = InNetNS(t, ns, func() error {
		if err := configure("eth0", outsideAddr, netip.Addr{}); err != nil {
			return err
		}
		for _, r := range routes {
			dst := &net.IPNet{IP: r.Addr().AsSlice(), Mask: net.CIDRMask(r.Bits(), r.Addr().BitLen())}
			if err := netlink.RouteAdd(&netlink.Route{Dst: dst, Gw: hostAddr.Addr().AsSlice()}); err != nil {
				return fmt.Errorf("route %s: %w", r, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("uplink %s: %v", hostIf, err)
	}
	return ns
}

// configure puts addr on ifname, brings it and lo up, and routes through gw
// when it is valid. It acts in the calling thread's namespace.
func configure(ifname string, addr netip.Prefix, gw netip.Addr) error {
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		return fmt.Errorf("lo: %w", err)
	}
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return err
	}
	ipn := &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), addr.Addr().BitLen())}
	if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: ipn, Flags: 0x02 /* IFA_F_NODAD */}); err != nil {
		return fmt.Errorf("address %s: %w", addr, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return err
	}
	if gw.IsValid() {
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: gw.AsSlice()}); err != nil {
			return fmt.Errorf("default route via %s: %w", gw, err)
		}
	}
	return nil
}

// Serve runs a TCP server on addr inside ns until the test ends. It
// answers every connection with one line: "<name> sees <client address>",
// which tells a prober who answered and what source address arrived.
func Serve(t testing.TB, ns netns.NsHandle, addr, name string) {
	t.Helper()
	var ln net.Listener
	if err := InNetNS(t, ns, func() (err error) { ln, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatalf("serve %s on %s: %v", name, addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			fmt.Fprintf(c, "%s sees %s\n", name, host)
			c.Close()
		}
	}()
}

// Probe connects from ns to addr (bounded at two seconds) and returns the
// line the server sent.
func Probe(t testing.TB, ns netns.NsHandle, addr string) (string, error) {
	t.Helper()
	var line string
	err := InNetNS(t, ns, func() error {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		line, err = bufio.NewReader(c).ReadString('\n')
		line = strings.TrimSpace(line)
		return err
	})
	return line, err
}

// HTTPGet fetches http://addr/path from inside ns (HTTP/1.0, bounded at
// two seconds) and returns the body.
func HTTPGet(t testing.TB, ns netns.NsHandle, addr, path string) (string, error) {
	t.Helper()
	var body string
	err := InNetNS(t, ns, func() error {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", path, addr)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			return fmt.Errorf("GET %s: %s", path, resp.Status)
		}
		body = string(b)
		return err
	})
	return body, err
}

package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
)

// aliasPrefix marks the links writ made; the alias names the owner, so a
// name collision is detected instead of two networks sharing a bridge.
const aliasPrefix = "writ:"

// ownedLink returns the link called name, or nil if there is none; a link
// of that name made for another owner (or not by writ) is an error.
func ownedLink(name, owner string) (netlink.Link, error) {
	link, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil, nil
		}
		return nil, fmt.Errorf("network: look up %s: %w", name, err)
	}
	if got := link.Attrs().Alias; got != aliasPrefix+owner {
		return nil, fmt.Errorf("network: interface %s exists but belongs to %q, not %q (a name collision or a foreign interface; not touching it): %w", name, got, aliasPrefix+owner, ErrConflict)
	}
	return link, nil
}

// addOwnedLink creates link and labels it with its owner.
func addOwnedLink(link netlink.Link, owner string) (netlink.Link, error) {
	name := link.Attrs().Name
	if err := netlink.LinkAdd(link); err != nil {
		return nil, fmt.Errorf("network: create %s: %w", name, err)
	}
	created, err := netlink.LinkByName(name)
	if err == nil {
		err = netlink.LinkSetAlias(created, aliasPrefix+owner)
	}
	if err != nil {
		if created != nil {
			netlink.LinkDel(created)
		}
		return nil, fmt.Errorf("network: label %s: %w", name, err)
	}
	return created, nil
}

// ensureBridge makes the network's bridge with its gateway address(es), up.
func ensureBridge(n Network) error {
	owner := "net/" + n.Name
	link, err := ownedLink(n.Bridge, owner)
	if err != nil {
		return err
	}
	if link == nil {
		if link, err = addOwnedLink(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: n.Bridge}}, owner); err != nil {
			return err
		}
	}
	addrs := []*net.IPNet{{IP: n.Gateway.AsSlice(), Mask: net.CIDRMask(n.Subnet.Bits(), 32)}}
	if n.Prefix6.IsValid() {
		addrs = append(addrs, &net.IPNet{IP: n.Gateway6.AsSlice(), Mask: net.CIDRMask(n.Prefix6.Bits(), 128)})
	}
	for _, a := range addrs {
		// IFA_F_NODAD: the gateway address is ours by construction, and
		// duplicate detection would hold it back for a second or more.
		if err := netlink.AddrReplace(link, &netlink.Addr{IPNet: a, Flags: 0x02}); err != nil {
			return fmt.Errorf("network: gateway address %s on %s: %w", a, n.Bridge, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("network: bring up %s: %w", n.Bridge, err)
	}
	return nil
}

// deleteBridge removes a network's bridge; a missing one is not an error.
func deleteBridge(name string) error {
	link, err := ownedLink(BridgeName(name), "net/"+name)
	if err != nil || link == nil {
		return err
	}
	if err := netlink.LinkDel(link); err != nil {
		return fmt.Errorf("network: delete bridge of %s: %w", name, err)
	}
	return nil
}

// bridgePorts lists the interfaces attached to a bridge.
func bridgePorts(bridge string) ([]string, error) {
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil, nil
		}
		return nil, fmt.Errorf("network: %w", err)
	}
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("network: list links: %w", err)
	}
	var out []string
	for _, l := range links {
		if l.Attrs().MasterIndex == br.Attrs().Index {
			out = append(out, l.Attrs().Name)
		}
	}
	return out, nil
}

// NIC is a VM network interface: a tap on a writ network with the VM's
// MAC address and its allocated address.
type NIC struct {
	Network string       `json:"network"`
	Tap     string       `json:"tap"`
	MAC     string       `json:"mac"`
	Addr    netip.Addr   `json:"address"`
	Prefix  netip.Prefix `json:"subnet"`
	Gateway netip.Addr   `json:"gateway"`
	Addr6   netip.Addr   `json:"address6"`
}

func nicOwner(vm string, nic int) string { return fmt.Sprintf("vm/%s/%d", vm, nic) }

// Attach gives VM vm's NIC number nic a place on the network: an address
// (kept across restarts), and a persistent tap attached to the bridge for
// the hypervisor to open. Calling it again returns the same NIC.
//
// The tap's own MAC is the guest's with the first byte set to 0xfe: a tap
// carrying the guest's MAC would make the bridge treat the guest's frames
// as addressed to the host itself.
func (h *Host) Attach(ctx context.Context, network, vm string, nic int) (NIC, error) {
	n, err := h.Network(ctx, network)
	if err != nil {
		return NIC{}, err
	}
	addr, err := h.Allocate(ctx, network, nicOwner(vm, nic))
	if err != nil {
		return NIC{}, err
	}
	mac := MAC(vm, nic)
	out := NIC{Network: network, Tap: TapName(vm, nic), MAC: mac.String(), Addr: addr, Prefix: n.Subnet, Gateway: n.Gateway}
	if n.Prefix6.IsValid() {
		out.Addr6 = EUI64(n.Prefix6, mac)
	}
	err = h.locked(func() error {
		return h.Do(func() error { return ensureTap(n, vm, nic) })
	})
	return out, err
}

// ensureTap makes VM vm's tap for NIC nic on network n, if missing, and
// attaches it to the bridge, up. It runs in the Host's namespace.
func ensureTap(n Network, vm string, nic int) error {
	name, owner := TapName(vm, nic), "tap/"+nicOwner(vm, nic)
	link, err := ownedLink(name, owner)
	if err != nil {
		return err
	}
	bridge, err := netlink.LinkByName(n.Bridge)
	if err != nil {
		return fmt.Errorf("network: bridge of %s: %w", n.Name, err)
	}
	if link == nil {
		tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_DEFAULTS}
		if link, err = addOwnedLink(tap, owner); err != nil {
			return err
		}
	}
	mac := MAC(vm, nic)
	hostMAC := append(net.HardwareAddr{0xfe}, mac[1:]...)
	if err := netlink.LinkSetHardwareAddr(link, hostMAC); err != nil {
		return fmt.Errorf("network: MAC of %s: %w", name, err)
	}
	if link.Attrs().MasterIndex != bridge.Attrs().Index {
		if err := netlink.LinkSetMaster(link, bridge); err != nil {
			return fmt.Errorf("network: attach %s to %s: %w", name, n.Bridge, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("network: bring up %s: %w", name, err)
	}
	return nil
}

// parseNICOwner is nicOwner's inverse.
func parseNICOwner(owner string) (vm string, nic int, ok bool) {
	rest, ok := strings.CutPrefix(owner, "vm/")
	i := strings.LastIndexByte(rest, '/')
	if !ok || i <= 0 {
		return "", 0, false
	}
	nic, err := strconv.Atoi(rest[i+1:])
	return rest[:i], nic, err == nil && nic >= 0
}

// Detach removes the VM NIC's tap and releases its address (and with it
// any forwards to that address). Detaching twice is not an error.
func (h *Host) Detach(ctx context.Context, network, vm string, nic int) error {
	err := h.locked(func() error {
		return h.Do(func() error {
			link, err := ownedLink(TapName(vm, nic), "tap/"+nicOwner(vm, nic))
			if err != nil || link == nil {
				return err
			}
			if err := netlink.LinkDel(link); err != nil {
				return fmt.Errorf("network: delete tap %s: %w", link.Attrs().Name, err)
			}
			return nil
		})
	})
	if err != nil {
		return err
	}
	return h.Release(ctx, network, nicOwner(vm, nic))
}

// EUI64 returns the address in prefix (a /64) that SLAAC derives from mac.
func EUI64(prefix netip.Prefix, mac net.HardwareAddr) netip.Addr {
	b := prefix.Masked().Addr().As16()
	b[8], b[9], b[10] = mac[0]^0x02, mac[1], mac[2]
	b[11], b[12] = 0xff, 0xfe
	b[13], b[14], b[15] = mac[3], mac[4], mac[5]
	return netip.AddrFrom16(b)
}

package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
)

// aliasPrefix marks the links writ made; the alias names the owner, so a
// name collision is detected instead of two networks sharing a bridge.
const aliasPrefix = "writ:"

// Host manages writ networks and taps in the network namespace of the
// calling thread. Taps are created through /dev/net/tun, which acts in the
// calling thread's namespace: callers outside the host namespace lock their
// goroutine to its thread first (tests do).
type Host struct {
	// StateDir keeps per-network address state. Required.
	StateDir string
}

// Network is a writ network on this host.
type Network struct {
	Name    string       `json:"name"`
	Bridge  string       `json:"bridge"`
	Subnet  netip.Prefix `json:"subnet"`
	Gateway netip.Addr   `json:"gateway"`
}

// IPAM returns the address allocator of a network.
func (h *Host) IPAM(n Network) (*IPAM, error) {
	return NewIPAM(filepath.Join(h.StateDir, "ipam", n.Name+".json"), n.Subnet)
}

// ensureOwned returns the link called name, or nil if there is none; a link
// of that name made for another owner is an error.
func ensureOwned(name, owner string) (netlink.Link, error) {
	link, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil, nil
		}
		return nil, fmt.Errorf("network: look up %s: %w", name, err)
	}
	if got := link.Attrs().Alias; got != aliasPrefix+owner {
		return nil, fmt.Errorf("network: interface %s exists but belongs to %q, not %q (a name collision or a foreign interface; not touching it)", name, got, aliasPrefix+owner)
	}
	return link, nil
}

// EnsureNetwork makes the network's bridge, with the gateway address
// (the subnet's first host), up. Calling it again changes nothing.
func (h *Host) EnsureNetwork(name string, subnet netip.Prefix) (Network, error) {
	if !ValidName(name) {
		return Network{}, fmt.Errorf("network: name %q: %w", name, ErrInvalidName)
	}
	ipam, err := NewIPAM(filepath.Join(h.StateDir, "ipam", name+".json"), subnet)
	if err != nil {
		return Network{}, err
	}
	n := Network{Name: name, Bridge: BridgeName(name), Subnet: ipam.Subnet(), Gateway: ipam.Gateway()}
	link, err := ensureOwned(n.Bridge, "net/"+name)
	if err != nil {
		return Network{}, err
	}
	if link == nil {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: n.Bridge}}
		if err := netlink.LinkAdd(br); err != nil {
			return Network{}, fmt.Errorf("network: create bridge %s for %s: %w", n.Bridge, name, err)
		}
		if link, err = netlink.LinkByName(n.Bridge); err != nil {
			return Network{}, fmt.Errorf("network: %w", err)
		}
		if err := netlink.LinkSetAlias(link, aliasPrefix+"net/"+name); err != nil {
			return Network{}, fmt.Errorf("network: label bridge %s: %w", n.Bridge, err)
		}
	}
	gw := &netlink.Addr{IPNet: &net.IPNet{IP: n.Gateway.AsSlice(), Mask: net.CIDRMask(n.Subnet.Bits(), 32)}}
	if err := netlink.AddrReplace(link, gw); err != nil {
		return Network{}, fmt.Errorf("network: gateway address on %s: %w", n.Bridge, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return Network{}, fmt.Errorf("network: bring up %s: %w", n.Bridge, err)
	}
	return n, nil
}

// DeleteNetwork removes the network's bridge and address state. Deleting a
// missing network is not an error.
func (h *Host) DeleteNetwork(name string) error {
	if !ValidName(name) {
		return fmt.Errorf("network: name %q: %w", name, ErrInvalidName)
	}
	link, err := ensureOwned(BridgeName(name), "net/"+name)
	if err != nil {
		return err
	}
	if link != nil {
		if err := netlink.LinkDel(link); err != nil {
			return fmt.Errorf("network: delete bridge of %s: %w", name, err)
		}
	}
	for _, suffix := range []string{".json", ".json.lock"} {
		os.Remove(filepath.Join(h.StateDir, "ipam", name+suffix))
	}
	return nil
}

// EnsureTap makes a persistent tap for a VM's NIC, attached to the
// network's bridge, with the VM's MAC, up. It returns the tap's name.
func (h *Host) EnsureTap(vm string, nic int, n Network) (string, error) {
	name := TapName(vm, nic)
	owner := fmt.Sprintf("tap/%s/%d", vm, nic)
	link, err := ensureOwned(name, owner)
	if err != nil {
		return "", err
	}
	bridge, err := netlink.LinkByName(n.Bridge)
	if err != nil {
		return "", fmt.Errorf("network: bridge of %s: %w (EnsureNetwork first)", n.Name, err)
	}
	if link == nil {
		tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_DEFAULTS}
		if err := netlink.LinkAdd(tap); err != nil {
			return "", fmt.Errorf("network: create tap %s: %w", name, err)
		}
		if link, err = netlink.LinkByName(name); err != nil {
			return "", fmt.Errorf("network: %w", err)
		}
		if err := netlink.LinkSetAlias(link, aliasPrefix+owner); err != nil {
			return "", fmt.Errorf("network: label tap %s: %w", name, err)
		}
	}
	if err := netlink.LinkSetHardwareAddr(link, MAC(vm, nic)); err != nil {
		return "", fmt.Errorf("network: MAC of %s: %w", name, err)
	}
	if link.Attrs().MasterIndex != bridge.Attrs().Index {
		if err := netlink.LinkSetMaster(link, bridge); err != nil {
			return "", fmt.Errorf("network: attach %s to %s: %w", name, n.Bridge, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return "", fmt.Errorf("network: bring up %s: %w", name, err)
	}
	return name, nil
}

// DeleteTap removes a VM NIC's tap; a missing one is not an error.
func (h *Host) DeleteTap(vm string, nic int) error {
	link, err := ensureOwned(TapName(vm, nic), fmt.Sprintf("tap/%s/%d", vm, nic))
	if err != nil || link == nil {
		return err
	}
	if err := netlink.LinkDel(link); err != nil {
		return fmt.Errorf("network: delete tap %s: %w", link.Attrs().Name, err)
	}
	return nil
}

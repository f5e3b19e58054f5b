// Package network is the node's network layer: writ networks (a bridge
// each, with the gateway address), taps for VM NICs, address management,
// and nftables rules in writ's own table.
//
// This file holds the parts that need no privileges: interface names,
// MAC addresses and the persisted address allocator (IPAM).
package network

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"

	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/internal/atomicfile"
)

// maxIfName is the kernel's interface name limit (IFNAMSIZ - 1).
const maxIfName = 15

var nameRe = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,62}$`)

// ValidName reports whether s is a valid network name.
func ValidName(s string) bool { return nameRe.MatchString(s) }

// ifName derives a kernel interface name (≤ 15 characters) from kind and
// key: the same key always gives the same name, and 48 bits of hash make a
// collision between two keys improbable (Ensure* checks the link's alias,
// so one would be reported, never shared).
func ifName(prefix, key string) string {
	sum := sha256.Sum256([]byte(key))
	name := prefix + hex.EncodeToString(sum[:6])
	return name[:min(len(name), maxIfName)]
}

// BridgeName returns the bridge interface name of a network.
func BridgeName(network string) string { return ifName("wb", "net/"+network) }

// TapName returns the tap interface name of a VM's NIC.
func TapName(vm string, nic int) string { return ifName("wt", fmt.Sprintf("tap/%s/%d", vm, nic)) }

// MAC returns the MAC address of a workload's NIC: derived from its name,
// locally administered and unicast, so a re-created VM keeps its address.
func MAC(workload string, nic int) net.HardwareAddr {
	sum := sha256.Sum256([]byte(fmt.Sprintf("mac/%s/%d", workload, nic)))
	return net.HardwareAddr{0x02, sum[0], sum[1], sum[2], sum[3], sum[4]}
}

// IPAM hands out addresses of one network's subnet to owners (VM NICs),
// persisted in a file so a restarted runner never hands out an address in
// use. It is safe across processes (flock) and idempotent: an owner asking
// again gets the address it has.
type IPAM struct {
	path   string
	subnet netip.Prefix
}

type ipamState struct {
	Subnet string            `json:"subnet"`
	Owners map[string]string `json:"owners"` // owner → address
}

// NewIPAM returns the allocator of subnet, kept in file path.
func NewIPAM(path string, subnet netip.Prefix) (*IPAM, error) {
	subnet = subnet.Masked()
	if !subnet.Addr().Is4() || subnet.Bits() > 30 {
		return nil, fmt.Errorf("network: subnet %s must be IPv4 and at most /30", subnet)
	}
	return &IPAM{path: path, subnet: subnet}, nil
}

// Gateway returns the subnet's gateway: its first host address.
func (a *IPAM) Gateway() netip.Addr { return a.subnet.Addr().Next() }

// Subnet returns the subnet.
func (a *IPAM) Subnet() netip.Prefix { return a.subnet }

// with runs fn on the state under an exclusive lock and saves it when fn
// says so (atomically, so a crash never leaves a torn file).
func (a *IPAM) with(fn func(st *ipamState) (save bool, err error)) error {
	if err := os.MkdirAll(filepath.Dir(a.path), 0o755); err != nil {
		return fmt.Errorf("network: ipam: %w", err)
	}
	lock, err := os.OpenFile(a.path+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("network: ipam: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("network: ipam lock: %w", err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)
	st := &ipamState{Subnet: a.subnet.String(), Owners: map[string]string{}}
	if data, err := os.ReadFile(a.path); err == nil {
		if err := json.Unmarshal(data, st); err != nil {
			return fmt.Errorf("network: ipam state %s is corrupt: %w", a.path, err)
		}
		if st.Subnet != a.subnet.String() {
			return fmt.Errorf("network: ipam state %s is for subnet %s, not %s", a.path, st.Subnet, a.subnet)
		}
		if st.Owners == nil {
			st.Owners = map[string]string{}
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("network: ipam: %w", err)
	}
	save, err := fn(st)
	if err != nil || !save {
		return err
	}
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("network: ipam: %w", err)
	}
	if err := atomicfile.WriteFile(a.path, data, 0o644); err != nil {
		return fmt.Errorf("network: ipam: %w", err)
	}
	return nil
}

// Allocate returns owner's address, allocating the lowest free one (not
// the network, gateway or broadcast address) on first use. A full subnet
// is ErrExhausted.
func (a *IPAM) Allocate(owner string) (netip.Addr, error) {
	var out netip.Addr
	err := a.with(func(st *ipamState) (bool, error) {
		if s, ok := st.Owners[owner]; ok {
			out = netip.MustParseAddr(s)
			return false, nil
		}
		used := map[netip.Addr]bool{}
		for _, s := range st.Owners {
			used[netip.MustParseAddr(s)] = true
		}
		broadcast := lastAddr(a.subnet)
		for ip := a.Gateway().Next(); a.subnet.Contains(ip) && ip != broadcast; ip = ip.Next() {
			if !used[ip] {
				st.Owners[owner] = ip.String()
				out = ip
				return true, nil
			}
		}
		return false, fmt.Errorf("network: subnet %s: %w (%d addresses in use)", a.subnet, ErrExhausted, len(st.Owners))
	})
	return out, err
}

// Release frees owner's address; releasing twice is fine.
func (a *IPAM) Release(owner string) error {
	return a.with(func(st *ipamState) (bool, error) {
		if _, ok := st.Owners[owner]; !ok {
			return false, nil
		}
		delete(st.Owners, owner)
		return true, nil
	})
}

// Allocations returns owner → address, sorted by owner in the JSON sense.
func (a *IPAM) Allocations() (map[string]netip.Addr, error) {
	out := map[string]netip.Addr{}
	err := a.with(func(st *ipamState) (bool, error) {
		owners := make([]string, 0, len(st.Owners))
		for o := range st.Owners {
			owners = append(owners, o)
		}
		sort.Strings(owners)
		for _, o := range owners {
			out[o] = netip.MustParseAddr(st.Owners[o])
		}
		return false, nil
	})
	return out, err
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

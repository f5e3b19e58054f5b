package network

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/internal/atomicfile"
)

// Config sets up a Host.
type Config struct {
	// StateDir keeps the networks, their forwards and their address
	// allocations. Required.
	StateDir string
	// NetNS is the path of the network namespace to manage (such as
	// /var/run/netns/NAME or /proc/PID/ns/net). Optional: "" manages the
	// namespace of the thread that makes each call (the host's, normally).
	NetNS string
	// Overlay hands out IPv6 prefixes for networks that ask for none.
	// Optional: nil gives such networks IPv4 only.
	Overlay Overlay
	// AddressPool is where networks may be made; a network's subnet must
	// lie inside it and overlap no address or route the namespace already
	// has. Default DefaultAddressPool.
	AddressPool []netip.Prefix
	// ForwardPorts are the host ports forwards may take (never one a
	// process listens on). Default DefaultForwardPorts.
	ForwardPorts PortRange
	// Log receives one line per change to the host. Optional.
	Log *slog.Logger
}

// Spec is a network as a caller asks for it.
type Spec struct {
	// Name is the network's name, [a-z0-9][a-z0-9_.-]{0,62}.
	Name string `json:"name"`
	// Subnet is its IPv4 subnet (at most /30); the first host address is
	// the gateway, held by the bridge.
	Subnet netip.Prefix `json:"subnet"`
	// Prefix6 is an optional IPv6 prefix (a /64 normally); its first host
	// address goes on the bridge too. Zero asks the Overlay, if any.
	Prefix6 netip.Prefix `json:"prefix6"`
}

// Forward is a port forward: traffic to the host's own addresses on
// HostPort goes to Addr:Port inside the network.
type Forward struct {
	Proto    string     `json:"proto"` // "tcp" or "udp"
	HostPort uint16     `json:"host_port"`
	Addr     netip.Addr `json:"addr"`
	Port     uint16     `json:"port"`
}

func (f Forward) String() string {
	return fmt.Sprintf("%s %d -> %s", f.Proto, f.HostPort, netip.AddrPortFrom(f.Addr, f.Port))
}

// Network is a writ network on this host: its bridge, gateway and forwards.
type Network struct {
	Name     string       `json:"name"`
	Bridge   string       `json:"bridge"`
	Subnet   netip.Prefix `json:"subnet"`
	Gateway  netip.Addr   `json:"gateway"`
	Prefix6  netip.Prefix `json:"prefix6"`
	Gateway6 netip.Addr   `json:"gateway6"`
	Forwards []Forward    `json:"forwards"`
}

// Host manages the writ networks of one network namespace: bridges, taps,
// address allocation and writ's nftables table. Every method is idempotent
// and safe for concurrent use, also across processes sharing StateDir.
type Host struct {
	cfg Config
	log *slog.Logger
	mu  sync.Mutex // serializes changes in this process; flock does it across processes
}

// New returns the Host of cfg. It changes nothing on the host: call
// Restore to bring back the networks in StateDir after a reboot.
func New(cfg Config) (*Host, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("network: Config.StateDir is required")
	}
	if err := os.MkdirAll(filepath.Join(cfg.StateDir, "networks"), 0o755); err != nil {
		return nil, fmt.Errorf("network: state directory: %w", err)
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if len(cfg.AddressPool) == 0 {
		cfg.AddressPool = DefaultAddressPool
	}
	if cfg.ForwardPorts == (PortRange{}) {
		cfg.ForwardPorts = DefaultForwardPorts
	}
	return &Host{cfg: cfg, log: log}, nil
}

// Do runs fn on a thread inside the Host's network namespace, so that
// everything fn creates (links, taps, sockets, child processes) is made
// there. With no NetNS configured it just calls fn.
func (h *Host) Do(fn func() error) error {
	if h.cfg.NetNS == "" {
		return fn()
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("network: current namespace: %w", err)
	}
	defer orig.Close()
	target, err := netns.GetFromPath(h.cfg.NetNS)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("network: namespace %s: %w", h.cfg.NetNS, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("network: enter namespace %s: %w", h.cfg.NetNS, err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// Keep the thread locked: Go discards a locked thread when its
		// goroutine ends, so no other goroutine runs in the wrong namespace.
		return errors.Join(ferr, fmt.Errorf("network: leave namespace: %w", err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// locked runs fn holding the Host's locks (in-process and flock).
func (h *Host) locked(fn func() error) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	f, err := os.OpenFile(filepath.Join(h.cfg.StateDir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("network: lock: %w", err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("network: lock: %w", err)
	}
	defer unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return fn()
}

func (h *Host) statePath(name string) string {
	return filepath.Join(h.cfg.StateDir, "networks", name+".json")
}

func (h *Host) ipam(n Network) (*IPAM, error) {
	return NewIPAM(filepath.Join(h.cfg.StateDir, "ipam", n.Name+".json"), n.Subnet)
}

// ipamLocked loads a network and its address allocator.
func (h *Host) ipamLocked(network string) (Network, *IPAM, error) {
	n, err := h.loadLocked(network)
	if err != nil {
		return Network{}, nil, err
	}
	ipam, err := h.ipam(n)
	return n, ipam, err
}

// loadLocked reads one network's state; ErrNotFound when there is none.
func (h *Host) loadLocked(name string) (Network, error) {
	if !ValidName(name) {
		return Network{}, fmt.Errorf("network: name %q: %w", name, ErrInvalidName)
	}
	data, err := os.ReadFile(h.statePath(name))
	if errors.Is(err, os.ErrNotExist) {
		return Network{}, fmt.Errorf("network %q: %w", name, ErrNotFound)
	}
	if err != nil {
		return Network{}, fmt.Errorf("network: %w", err)
	}
	var n Network
	if err := json.Unmarshal(data, &n); err != nil {
		return Network{}, fmt.Errorf("network: state %s is corrupt: %w", h.statePath(name), err)
	}
	return n, nil
}

func (h *Host) saveLocked(n Network) error {
	if n.Forwards == nil {
		n.Forwards = []Forward{}
	}
	data, err := json.MarshalIndent(n, "", "  ")
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	return atomicfile.WriteFile(h.statePath(n.Name), data, 0o644)
}

// listLocked returns every network in the state, sorted by name.
func (h *Host) listLocked() ([]Network, error) {
	entries, err := os.ReadDir(filepath.Join(h.cfg.StateDir, "networks"))
	if err != nil {
		return nil, fmt.Errorf("network: %w", err)
	}
	var out []Network
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || strings.HasPrefix(name, ".") {
			continue
		}
		n, err := h.loadLocked(name)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// EnsureNetwork makes the network: its state, a bridge with the gateway
// address(es), forwarding on, and its rules in writ's nftables table. It
// returns the network as it now is. Calling it again with the same spec
// changes nothing; another subnet for an existing name, or a subnet that
// overlaps another network's, is ErrConflict. If the kernel refuses a new
// network, nothing of it is left behind.
func (h *Host) EnsureNetwork(ctx context.Context, spec Spec) (Network, error) {
	var out Network
	err := h.locked(func() error {
		if !ValidName(spec.Name) {
			return fmt.Errorf("network: name %q: %w", spec.Name, ErrInvalidName)
		}
		ipam, err := NewIPAM(filepath.Join(h.cfg.StateDir, "ipam", spec.Name+".json"), spec.Subnet)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrInvalid, err)
		}
		subnet := ipam.Subnet()
		existing, err := h.loadLocked(spec.Name)
		isNew := errors.Is(err, ErrNotFound)
		if err != nil && !isNew {
			return err
		}
		if !isNew && existing.Subnet != subnet {
			return fmt.Errorf("network %q exists with subnet %s, not %s (delete it first): %w", spec.Name, existing.Subnet, subnet, ErrConflict)
		}
		if !inPool(subnet, h.cfg.AddressPool) {
			return fmt.Errorf("network %q: subnet %s is outside the node's address pool %v: %w", spec.Name, subnet, h.cfg.AddressPool, ErrInvalid)
		}
		if isNew {
			var clash string
			if err := h.Do(func() error { var err error; clash, err = hostOverlap(subnet, BridgeName(spec.Name)); return err }); err != nil {
				return err
			}
			if clash != "" {
				return fmt.Errorf("network %q: subnet %s overlaps the node's own %s: %w", spec.Name, subnet, clash, ErrConflict)
			}
		}
		all, err := h.listLocked()
		if err != nil {
			return err
		}
		for _, o := range all {
			if o.Name != spec.Name && o.Subnet.Overlaps(subnet) {
				return fmt.Errorf("network %q: subnet %s overlaps network %q (%s): %w", spec.Name, subnet, o.Name, o.Subnet, ErrConflict)
			}
		}
		n := existing
		if isNew {
			n = Network{Name: spec.Name, Bridge: BridgeName(spec.Name), Subnet: subnet, Gateway: ipam.Gateway(), Forwards: []Forward{}}
			prefix6 := spec.Prefix6
			if !prefix6.IsValid() && h.cfg.Overlay != nil {
				if prefix6, err = h.cfg.Overlay.Prefix(ctx, spec.Name); err != nil {
					return fmt.Errorf("network %q: overlay prefix: %w", spec.Name, err)
				}
			}
			if prefix6.IsValid() {
				if !prefix6.Addr().Is6() || prefix6.Addr().Is4In6() || prefix6.Bits() > 126 {
					return fmt.Errorf("network %q: IPv6 prefix %s: %w", spec.Name, prefix6, ErrInvalid)
				}
				n.Prefix6 = prefix6.Masked()
				n.Gateway6 = n.Prefix6.Addr().Next()
			}
		} else if spec.Prefix6.IsValid() && spec.Prefix6.Masked() != existing.Prefix6 {
			return fmt.Errorf("network %q exists with IPv6 prefix %v, not %s (delete it first): %w", spec.Name, existing.Prefix6, spec.Prefix6, ErrConflict)
		}
		if err := h.saveLocked(n); err != nil {
			return err
		}
		if isNew {
			all = append(all, n)
		}
		err = h.Do(func() error {
			if err := ensureBridge(n); err != nil {
				return err
			}
			if err := enableForwarding(n.Prefix6.IsValid()); err != nil {
				return err
			}
			return applyFirewall(all)
		})
		if err != nil && isNew {
			// Leave nothing of a network the kernel refused.
			os.Remove(h.statePath(n.Name))
			h.Do(func() error { deleteBridge(n.Name); return nil })
			return err
		}
		if err == nil && isNew {
			h.log.Info("network created", "network", n.Name, "bridge", n.Bridge, "subnet", n.Subnet)
		}
		out = n
		return err
	})
	return out, err
}

// DeleteNetwork removes a network: its rules, bridge and state, including
// its address allocations. It is refused with ErrInUse while interfaces
// (taps, veths) are still attached to its bridge. Deleting a network that
// does not exist is not an error.
func (h *Host) DeleteNetwork(ctx context.Context, name string) error {
	return h.locked(func() error {
		n, err := h.loadLocked(name)
		if errors.Is(err, ErrNotFound) {
			return h.Do(func() error { return deleteBridge(name) }) // a crash may have left one
		}
		if err != nil {
			return err
		}
		all, err := h.listLocked()
		if err != nil {
			return err
		}
		rest := all[:0]
		for _, o := range all {
			if o.Name != name {
				rest = append(rest, o)
			}
		}
		err = h.Do(func() error {
			ports, err := bridgePorts(n.Bridge)
			if err != nil {
				return err
			}
			if len(ports) > 0 {
				return fmt.Errorf("network %q has interfaces attached (%s); detach them first: %w", name, strings.Join(ports, ", "), ErrInUse)
			}
			if err := applyFirewall(rest); err != nil {
				return err
			}
			return deleteBridge(name)
		})
		if err != nil {
			return err
		}
		for _, p := range []string{h.statePath(name), filepath.Join(h.cfg.StateDir, "ipam", name+".json"), filepath.Join(h.cfg.StateDir, "ipam", name+".json.lock")} {
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("network: %w", err)
			}
		}
		h.log.Info("network deleted", "network", name)
		return nil
	})
}

// Networks returns the networks on this host, sorted by name.
func (h *Host) Networks(ctx context.Context) ([]Network, error) {
	var out []Network
	err := h.locked(func() (err error) { out, err = h.listLocked(); return err })
	if out == nil {
		out = []Network{}
	}
	return out, err
}

// Network returns one network; ErrNotFound if there is none.
func (h *Host) Network(ctx context.Context, name string) (Network, error) {
	var out Network
	err := h.locked(func() (err error) { out, err = h.loadLocked(name); return err })
	return out, err
}

// Allocate returns the address of owner (a workload's NIC) on the network,
// allocating the lowest free one the first time. Addresses survive
// restarts and are never handed out twice; a full subnet is ErrExhausted.
func (h *Host) Allocate(ctx context.Context, network, owner string) (netip.Addr, error) {
	var out netip.Addr
	err := h.locked(func() error {
		_, ipam, err := h.ipamLocked(network)
		if err != nil {
			return err
		}
		out, err = ipam.Allocate(owner)
		return err
	})
	return out, err
}

// Release frees owner's address on the network and removes the forwards
// that pointed at it, so a later owner of the address inherits none.
// Releasing an address not held is not an error.
func (h *Host) Release(ctx context.Context, network, owner string) error {
	return h.locked(func() error {
		n, ipam, err := h.ipamLocked(network)
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		held, err := ipam.Allocations()
		if err != nil {
			return err
		}
		addr, ok := held[owner]
		if !ok {
			return nil
		}
		kept := withoutForwards(n.Forwards, func(f Forward) bool { return f.Addr == addr })
		if len(kept) != len(n.Forwards) {
			n.Forwards = kept
			if err := h.commitLocked(n); err != nil {
				return err
			}
		}
		return ipam.Release(owner)
	})
}

// Allocations returns owner → address on the network.
func (h *Host) Allocations(ctx context.Context, network string) (map[string]netip.Addr, error) {
	var out map[string]netip.Addr
	err := h.locked(func() error {
		_, ipam, err := h.ipamLocked(network)
		if err != nil {
			return err
		}
		out, err = ipam.Allocations()
		return err
	})
	return out, err
}

// AddForward forwards f.Proto traffic for the host's own addresses on
// f.HostPort to f.Addr:f.Port in the network. Adding the same forward
// again changes nothing; a host port already forwarded elsewhere is
// ErrConflict.
func (h *Host) AddForward(ctx context.Context, network string, f Forward) (Network, error) {
	var out Network
	err := h.locked(func() error {
		n, err := h.loadLocked(network)
		if err != nil {
			return err
		}
		if f.Proto != "tcp" && f.Proto != "udp" {
			return fmt.Errorf("forward: protocol %q, want tcp or udp: %w", f.Proto, ErrInvalid)
		}
		if f.HostPort == 0 || f.Port == 0 {
			return fmt.Errorf("forward: ports must be 1-65535: %w", ErrInvalid)
		}
		if !h.cfg.ForwardPorts.contains(f.HostPort) {
			return fmt.Errorf("forward: host port %d is outside the node's forward range %s: %w", f.HostPort, h.cfg.ForwardPorts, ErrInvalid)
		}
		if !n.Subnet.Contains(f.Addr) || f.Addr == n.Gateway || f.Addr == n.Subnet.Addr() || f.Addr == lastAddr(n.Subnet) {
			return fmt.Errorf("forward: %s is not a guest address of network %q (%s): %w", f.Addr, network, n.Subnet, ErrInvalid)
		}
		all, err := h.listLocked()
		if err != nil {
			return err
		}
		for _, o := range all {
			for _, g := range o.Forwards {
				if g.Proto != f.Proto || g.HostPort != f.HostPort {
					continue
				}
				if o.Name == network && g == f {
					out = n
					return nil // already there
				}
				return fmt.Errorf("forward %s: host port %s/%d already forwards to %s on network %q: %w", f, f.Proto, f.HostPort, netip.AddrPortFrom(g.Addr, g.Port), o.Name, ErrConflict)
			}
		}
		// A new forward never takes a port a process of the node listens
		// on (sshd, the runner itself): its DNAT would hide the service.
		var busy bool
		if err := h.Do(func() error { busy = portInUse(f.Proto, f.HostPort); return nil }); err != nil {
			return err
		}
		if busy {
			return fmt.Errorf("forward %s: a process of the node listens on %s/%d: %w", f, f.Proto, f.HostPort, ErrConflict)
		}
		n.Forwards = append(n.Forwards, f)
		sort.Slice(n.Forwards, func(i, j int) bool {
			a, b := n.Forwards[i], n.Forwards[j]
			return a.Proto < b.Proto || a.Proto == b.Proto && a.HostPort < b.HostPort
		})
		if err := h.commitLocked(n); err != nil {
			return err
		}
		h.log.Info("port forward added", "network", network, "forward", f.String())
		out = n
		return nil
	})
	return out, err
}

// RemoveForward removes the forward of proto/hostPort from the network;
// removing one that is not there is not an error.
func (h *Host) RemoveForward(ctx context.Context, network, proto string, hostPort uint16) error {
	return h.locked(func() error {
		n, err := h.loadLocked(network)
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		kept := withoutForwards(n.Forwards, func(f Forward) bool { return f.Proto == proto && f.HostPort == hostPort })
		if len(kept) == len(n.Forwards) {
			return nil
		}
		n.Forwards = kept
		return h.commitLocked(n)
	})
}

// withoutForwards returns a new slice of the forwards drop does not match.
func withoutForwards(fs []Forward, drop func(Forward) bool) []Forward {
	kept := []Forward{}
	for _, f := range fs {
		if !drop(f) {
			kept = append(kept, f)
		}
	}
	return kept
}

// commitLocked saves a changed network and applies the firewall; if the
// kernel refuses, the previous state is put back.
func (h *Host) commitLocked(n Network) error {
	prev, err := h.loadLocked(n.Name)
	if err != nil {
		return err
	}
	if err := h.saveLocked(n); err != nil {
		return err
	}
	all, err := h.listLocked()
	if err == nil {
		err = h.Do(func() error { return applyFirewall(all) })
	}
	if err != nil {
		h.saveLocked(prev)
		return err
	}
	return nil
}

// Restore brings the host in line with the state: every network's bridge
// and addresses, the taps of the VM NICs attached to it, forwarding, and
// writ's nftables table. Run it at start (after a reboot the kernel has
// none of them, and a VM's hypervisor cannot start without its tap). It
// changes nothing when all is in place.
func (h *Host) Restore(ctx context.Context) error {
	return h.locked(func() error {
		all, err := h.listLocked()
		if err != nil {
			return err
		}
		nics := map[string]map[string]netip.Addr{}
		for _, n := range all {
			_, ipam, err := h.ipamLocked(n.Name)
			if err != nil {
				return err
			}
			if nics[n.Name], err = ipam.Allocations(); err != nil {
				return err
			}
		}
		return h.Do(func() error {
			v6 := false
			for _, n := range all {
				if err := ensureBridge(n); err != nil {
					return err
				}
				for owner := range nics[n.Name] {
					if vm, nic, ok := parseNICOwner(owner); ok {
						if err := ensureTap(n, vm, nic); err != nil {
							return err
						}
					}
				}
				v6 = v6 || n.Prefix6.IsValid()
			}
			if len(all) > 0 {
				if err := enableForwarding(v6); err != nil {
					return err
				}
			}
			return applyFirewall(all)
		})
	})
}

// Ruleset renders writ's nftables table as the kernel reports it (empty
// when there is none), in the form golden files use.
func (h *Host) Ruleset(ctx context.Context) (string, error) {
	var out string
	err := h.Do(func() (err error) { out, err = readRuleset(); return err })
	return out, err
}

// enableForwarding turns on IP forwarding in the current namespace (the
// sysctl is per namespace, and a routed bridge needs it).
func enableForwarding(v6 bool) error {
	files := []string{"/proc/sys/net/ipv4/ip_forward"}
	if v6 {
		files = append(files, "/proc/sys/net/ipv6/conf/all/forwarding")
	}
	for _, f := range files {
		if cur, err := os.ReadFile(f); err == nil && strings.TrimSpace(string(cur)) == "1" {
			continue
		}
		if err := os.WriteFile(f, []byte("1\n"), 0o644); err != nil {
			return fmt.Errorf("network: enable forwarding (%s): %w", f, err)
		}
	}
	return nil
}

// WaitTCP waits until a TCP connection to addr:port succeeds from the
// Host's namespace (a guest's service came up), polling until timeout or
// ctx ends.
func (h *Host) WaitTCP(ctx context.Context, addr netip.Addr, port uint16, timeout time.Duration) error {
	// Only guests of writ's networks: anything else would make this a
	// port scanner for the node's private side.
	var nets []Network
	if err := h.locked(func() error { var err error; nets, err = h.listLocked(); return err }); err != nil {
		return err
	}
	inside := false
	for _, n := range nets {
		if addr == n.Gateway || (n.Gateway6.IsValid() && addr == n.Gateway6) {
			// The gateway is the node itself, on the network's bridge:
			// through it a script would reach the node's own services.
			return fmt.Errorf("network: %s is network %q's gateway, the node itself: %w", addr, n.Name, ErrInvalid)
		}
		inside = inside || n.Subnet.Contains(addr) || (n.Prefix6.IsValid() && n.Prefix6.Contains(addr))
	}
	if !inside {
		return fmt.Errorf("network: %s is in none of the node's writ networks: %w", addr, ErrInvalid)
	}
	deadline := time.Now().Add(timeout)
	target := netip.AddrPortFrom(addr, port).String()
	for {
		err := h.Do(func() error {
			// Dial here: the socket is made in the namespace of this thread.
			c, err := net.DialTimeout("tcp", target, time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("network: %s did not accept a connection within %s: %w", target, timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

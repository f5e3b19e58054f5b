package host

import (
	"context"
	"errors"
	"fmt"
	"github.com/writ-fleet/writ/scripts"
	"net/netip"
	"strconv"
	"time"

	"github.com/d5/tengo/v2"

	"github.com/writ-fleet/writ/sal/network"
)

// Network is what the "net" module needs from the node's network layer;
// *network.Host satisfies it.
type Network interface {
	EnsureNetwork(ctx context.Context, spec network.Spec) (network.Network, error)
	DeleteNetwork(ctx context.Context, name string) error
	Networks(ctx context.Context) ([]network.Network, error)
	Allocate(ctx context.Context, network, owner string) (netip.Addr, error)
	Release(ctx context.Context, network, owner string) error
	AddForward(ctx context.Context, network string, f network.Forward) (network.Network, error)
	RemoveForward(ctx context.Context, network, proto string, hostPort uint16) error
	Attach(ctx context.Context, network, vm string, nic int) (network.NIC, error)
	Detach(ctx context.Context, network, vm string, nic int) error
	WaitTCP(ctx context.Context, addr netip.Addr, port uint16, timeout time.Duration) error
}

var _ Network = (*network.Host)(nil)

// NetworkModule returns the "net" module over host. With a nil host (a
// runner started without networking) every call returns an error value.
//
//	net.network(name, subnet[, prefix6])   ensure a network → {name, bridge, subnet, gateway, prefix6, gateway6, forwards}
//	net.delete_network(name)               (refused while interfaces are attached)
//	net.networks()                         → [network, ...]
//	net.address(network, owner)            the owner's address, allocated once → "10.0.0.2"
//	net.release(network, owner)            free it (and drop forwards to it)
//	net.forward(network, proto, host_port, address, port)   port forward → network
//	net.unforward(network, proto, host_port)
//	net.attach(network, vm, nic)           a VM NIC: tap + MAC + address → {network, tap, mac, address, subnet, gateway}
//	net.detach(network, vm, nic)           remove the tap, free the address and its forwards
//	net.wait_tcp(address, port, seconds)   wait until a guest accepts TCP connections
//
// Failures come back as error values, for the script to check with
// is_error(); a script that wants its job to fail calls job.fail.
func NetworkModule(layer Network) scripts.Module {
	return func(rc *scripts.Run) map[string]tengo.Object {
		var unavailable error
		if layer == nil {
			unavailable = errors.New("this runner has no network layer (run it as root, without --no-network)")
		}
		host := tenantNetwork{rc: rc, n: layer}
		call := func(name string, minArgs, maxArgs int, fn func(ctx context.Context, args []tengo.Object) (any, error)) tengo.Object {
			return hostFunc(rc, "net", name, minArgs, maxArgs, unavailable, fn)
		}
		return map[string]tengo.Object{
			"network": call("network", 2, 3, func(ctx context.Context, a []tengo.Object) (any, error) {
				spec := network.Spec{Name: str(a[0])}
				var err error
				if spec.Subnet, err = netip.ParsePrefix(str(a[1])); err != nil {
					return nil, fmt.Errorf("subnet %q: want an IPv4 prefix such as 10.88.0.0/24", str(a[1]))
				}
				if len(a) == 3 && str(a[2]) != "" {
					if spec.Prefix6, err = netip.ParsePrefix(str(a[2])); err != nil {
						return nil, fmt.Errorf("prefix6 %q: want an IPv6 prefix such as fd00:88::/64", str(a[2]))
					}
				}
				return host.EnsureNetwork(ctx, spec)
			}),
			"delete_network": call("delete_network", 1, 1, func(ctx context.Context, a []tengo.Object) (any, error) {
				return true, host.DeleteNetwork(ctx, str(a[0]))
			}),
			"networks": call("networks", 0, 0, func(ctx context.Context, _ []tengo.Object) (any, error) {
				return host.Networks(ctx)
			}),
			"address": call("address", 2, 2, func(ctx context.Context, a []tengo.Object) (any, error) {
				addr, err := host.Allocate(ctx, str(a[0]), str(a[1]))
				return addr.String(), err
			}),
			"release": call("release", 2, 2, func(ctx context.Context, a []tengo.Object) (any, error) {
				return true, host.Release(ctx, str(a[0]), str(a[1]))
			}),
			"forward": call("forward", 5, 5, func(ctx context.Context, a []tengo.Object) (any, error) {
				hostPort, err := port(a[2])
				if err != nil {
					return nil, fmt.Errorf("host_port: %w", err)
				}
				guestPort, err := port(a[4])
				if err != nil {
					return nil, fmt.Errorf("port: %w", err)
				}
				addr, err := netip.ParseAddr(str(a[3]))
				if err != nil {
					return nil, fmt.Errorf("address %q: want an IPv4 address", str(a[3]))
				}
				return host.AddForward(ctx, str(a[0]), network.Forward{Proto: str(a[1]), HostPort: hostPort, Addr: addr, Port: guestPort})
			}),
			"attach": call("attach", 3, 3, func(ctx context.Context, a []tengo.Object) (any, error) {
				nic, err := intArg(a[2])
				if err != nil {
					return nil, fmt.Errorf("nic: %w", err)
				}
				return host.Attach(ctx, str(a[0]), str(a[1]), nic)
			}),
			"detach": call("detach", 3, 3, func(ctx context.Context, a []tengo.Object) (any, error) {
				nic, err := intArg(a[2])
				if err != nil {
					return nil, fmt.Errorf("nic: %w", err)
				}
				return true, host.Detach(ctx, str(a[0]), str(a[1]), nic)
			}),
			"wait_tcp": call("wait_tcp", 3, 3, func(ctx context.Context, a []tengo.Object) (any, error) {
				addr, err := netip.ParseAddr(str(a[0]))
				if err != nil {
					return nil, fmt.Errorf("address %q: want an IP address", str(a[0]))
				}
				p, err := port(a[1])
				if err != nil {
					return nil, err
				}
				secs, err := intArg(a[2])
				if err != nil {
					return nil, fmt.Errorf("seconds: %w", err)
				}
				return true, host.WaitTCP(ctx, addr, p, time.Duration(secs)*time.Second)
			}),
			"unforward": call("unforward", 3, 3, func(ctx context.Context, a []tengo.Object) (any, error) {
				hostPort, err := port(a[2])
				if err != nil {
					return nil, fmt.Errorf("host_port: %w", err)
				}
				return true, host.RemoveForward(ctx, str(a[0]), str(a[1]), hostPort)
			}),
		}
	}
}

// intArg reads a non-negative integer given as an int or a string.
func intArg(o tengo.Object) (int, error) {
	if i, ok := o.(*tengo.Int); ok && i.Value >= 0 {
		return int(i.Value), nil
	}
	v, err := strconv.Atoi(str(o))
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%q is not a non-negative integer", str(o))
	}
	return v, nil
}

// port reads a port number given as an int or a string ("8080").
func port(o tengo.Object) (uint16, error) {
	var n int64
	switch x := o.(type) {
	case *tengo.Int:
		n = x.Value
	default:
		v, err := strconv.ParseInt(str(o), 10, 32)
		if err != nil {
			return 0, fmt.Errorf("%q is not a port number", str(o))
		}
		n = v
	}
	if n < 1 || n > 65535 {
		return 0, fmt.Errorf("%d is not a port number (1-65535)", n)
	}
	return uint16(n), nil
}

package network

import (
	"context"
	"net/netip"
)

// Overlay hands writ networks their IPv6 prefixes from an overlay network
// that routes them between nodes (such as Mycelium, where each node owns a
// /64 of 400::/7). It is the seam for overlay addressing: a Host with an
// Overlay asks it for the prefix of every new network that names none and
// puts the prefix's first address on the bridge; getting traffic for the
// prefix to this node is the overlay's job. writ ships no implementation
// yet: Config.Overlay is nil unless a caller supplies one.
type Overlay interface {
	// Prefix returns the IPv6 prefix for network. It must return the same
	// prefix for the same network every time (a restart re-creates the
	// network with it).
	Prefix(ctx context.Context, network string) (netip.Prefix, error)
}

package ledger

import (
	"context"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
)

// NodeCache reads registered nodes through Client and keeps them for TTL:
// what a runner checks a flow step's inputs with (the node that signed an
// output, its site and key). A node's key never changes (its ID is the
// key's hash); its revocation is also in its site's trust snapshot, which
// the checker reads as well, so a long TTL costs no safety.
type NodeCache struct {
	Client *Client
	// TTL is how long a node is kept; zero means DefaultNodeTTL.
	TTL time.Duration

	group   singleflight.Group
	mu      sync.Mutex
	entries map[string]nodeEntry // guarded by mu; at most maxCachedNodes
}

// DefaultNodeTTL is NodeCache's default TTL.
const DefaultNodeTTL = 5 * time.Minute

// maxCachedNodes bounds a NodeCache: inputs signed by many nodes cannot
// grow it without end.
const maxCachedNodes = 10000

type nodeEntry struct {
	node    *Node
	fetched time.Time
}

// Node returns the node id, from the cache or the ledger. An unknown node
// is NotFound.
func (c *NodeCache) Node(ctx context.Context, id string) (*Node, error) {
	ttl := c.TTL
	if ttl == 0 {
		ttl = DefaultNodeTTL
	}
	c.mu.Lock()
	e, ok := c.entries[id]
	c.mu.Unlock()
	if ok && time.Since(e.fetched) < ttl {
		return e.node, nil
	}
	v, err, _ := c.group.Do(id, func() (any, error) {
		return c.Client.Node(ctx, id)
	})
	if err != nil {
		return nil, err
	}
	n := v.(*Node)
	c.mu.Lock()
	if c.entries == nil || len(c.entries) >= maxCachedNodes {
		c.entries = map[string]nodeEntry{}
	}
	c.entries[id] = nodeEntry{node: n, fetched: time.Now()}
	c.mu.Unlock()
	return n, nil
}

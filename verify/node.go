package verify

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"

	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
)

// ErrNotSiteNode marks a node that may not act for a site: unknown to the
// ledger, of another site, revoked, or registered with a key that is not
// the one its ID is derived from.
var ErrNotSiteNode = errors.New("not a node of the site")

// SiteNode is the one rule for "node id acts for site": the ledger knows
// it, it belongs to site, it is not revoked (by its record, or by the
// site's trust snapshot when trust is given), and its registered public
// key hashes to its ID. It returns that key, an error wrapping
// ErrNotSiteNode that says which rule failed, or one wrapping
// ErrUnavailable when the ledger could not say. The dispatcher (a node's
// signed stream) and StepJob (the node that signed a step's output) call it.
func SiteNode(ctx context.Context, nodes NodeSource, trust TrustSource, site, id string) (ed25519.PublicKey, error) {
	n, err := nodes.Node(ctx, id)
	switch {
	case ledger.NotFound(err):
		return nil, fmt.Errorf("node %q: the ledger does not know it: %w", id, ErrNotSiteNode)
	case err != nil:
		return nil, fmt.Errorf("%w: look up node %s: %v", ErrUnavailable, id, err)
	case n.Site != site:
		return nil, fmt.Errorf("node %s belongs to site %q, not %q: %w", id, n.Site, site, ErrNotSiteNode)
	case n.RevokedAt != nil:
		return nil, fmt.Errorf("node %s is revoked: %w", id, ErrNotSiteNode)
	}
	if trust != nil {
		if snap, err := trust.Get(ctx, site); err == nil && snap.NodeRevoked(id) {
			return nil, fmt.Errorf("node %s is revoked: %w", id, ErrNotSiteNode)
		}
	}
	pub, _, err := keys.ParsePublic(n.PublicKey)
	if err != nil || ledger.NodeID(pub) != id {
		return nil, fmt.Errorf("node %s: the ledger's key for it is not the one its ID comes from: %w", id, ErrNotSiteNode)
	}
	return pub, nil
}

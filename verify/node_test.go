package verify

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
)

type fakeNodes map[string]*ledger.Node

func (f fakeNodes) Node(_ context.Context, id string) (*ledger.Node, error) {
	if id == "down" {
		return nil, errors.New("connection refused")
	}
	n, ok := f[id]
	if !ok {
		return nil, &ledger.APIError{Status: http.StatusNotFound}
	}
	return n, nil
}

type fakeTrust struct{ revoked []string }

func (f fakeTrust) Get(context.Context, string, ...string) (*ledger.Trust, error) {
	return &ledger.Trust{RevokedNodes: f.revoked}, nil
}

// TestSiteNode: the one rule for a node acting for a site, each way it
// can fail, the key that does not hash to the node's ID included.
func TestSiteNode(t *testing.T) {
	k, _ := keys.Generate("n")
	other, _ := keys.Generate("m")
	id := ledger.NodeID(k.Public)
	now := time.Now()
	nodes := fakeNodes{
		id:          {ID: id, Site: "lab", PublicKey: k.AuthorizedKey()},
		"elsewhere": {ID: "elsewhere", Site: "prod", PublicKey: k.AuthorizedKey()},
		"revoked":   {ID: "revoked", Site: "lab", PublicKey: k.AuthorizedKey(), RevokedAt: &now},
		"swapped":   {ID: "swapped", Site: "lab", PublicKey: other.AuthorizedKey()},
	}
	for _, tc := range []struct {
		name, id string
		trust    TrustSource
		want     error
	}{
		{"registered", id, nil, nil},
		{"unknown", "nobody", nil, ErrNotSiteNode},
		{"another site", "elsewhere", nil, ErrNotSiteNode},
		{"revoked", "revoked", nil, ErrNotSiteNode},
		{"revoked in the snapshot", id, fakeTrust{revoked: []string{id}}, ErrNotSiteNode},
		{"key not its ID's", "swapped", nil, ErrNotSiteNode},
		{"ledger down", "down", nil, ErrUnavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pub, err := SiteNode(context.Background(), nodes, tc.trust, "lab", tc.id)
			if tc.want == nil && (err != nil || !pub.Equal(k.Public)) || tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("SiteNode(%s) = %v, want %v", tc.id, err, tc.want)
			}
		})
	}
}

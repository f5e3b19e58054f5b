package ledger

import (
	"context"
	"net/http"
	"net/url"

	"github.com/writ-fleet/writ/keys"
)

// NodeClient returns a client that signs as the node of key k (keyid =
// its node ID), for Register and ReportUptime.
func NodeClient(baseURL string, k *keys.Key, hc *http.Client) *Client {
	return &Client{BaseURL: baseURL, Key: k, KeyID: NodeID(k.Public), HTTP: hc}
}

// Register registers the signing node (see the server's register).
func (c *Client) Register(ctx context.Context, req RegisterRequest) (*Node, error) {
	var n Node
	return &n, c.do(ctx, "POST", "/v1/nodes/register", req, &n, true)
}

// ReportUptime sends the node's uptime report.
func (c *Client) ReportUptime(ctx context.Context, id string, u Uptime) (*UptimeReply, error) {
	var rep UptimeReply
	return &rep, c.do(ctx, "POST", "/v1/nodes/"+url.PathEscape(id)+"/uptime", u, &rep, true)
}

// Nodes lists a site's nodes ("" for all) with their liveness.
func (c *Client) Nodes(ctx context.Context, site string) ([]Node, error) {
	var out []Node
	return out, c.do(ctx, "GET", "/v1/nodes?site="+url.QueryEscape(site), nil, &out, false)
}

// Node returns one node.
func (c *Client) Node(ctx context.Context, id string) (*Node, error) {
	var n Node
	return &n, c.do(ctx, "GET", "/v1/nodes/"+url.PathEscape(id), nil, &n, false)
}

// CreateToken makes an enrollment token for site (admin); ttl 0 is the
// default. The returned token carries its secret: keep it.
func (c *Client) CreateToken(ctx context.Context, site string, ttl Seconds) (*Token, error) {
	return c.CreateTokenFor(ctx, site, CreateTokenRequest{TTL: ttl})
}

// CreateTokenFor creates an enrollment token as req says (admin).
func (c *Client) CreateTokenFor(ctx context.Context, site string, req CreateTokenRequest) (*Token, error) {
	var t Token
	return &t, c.do(ctx, "POST", "/v1/sites/"+url.PathEscape(site)+"/tokens", req, &t, true)
}

// Tokens lists a site's tokens (without secrets).
func (c *Client) Tokens(ctx context.Context, site string) ([]Token, error) {
	var out []Token
	return out, c.do(ctx, "GET", "/v1/sites/"+url.PathEscape(site)+"/tokens", nil, &out, false)
}

// RevokeToken revokes a token (admin).
func (c *Client) RevokeToken(ctx context.Context, site, id string) (*Token, error) {
	var t Token
	return &t, c.do(ctx, "POST", "/v1/sites/"+url.PathEscape(site)+"/tokens/"+url.PathEscape(id)+"/revoke", nil, &t, true)
}

// RevokeNode revokes a node (admin).
func (c *Client) RevokeNode(ctx context.Context, id string) (*Node, error) {
	var n Node
	return &n, c.do(ctx, "POST", "/v1/nodes/"+url.PathEscape(id)+"/revoke", nil, &n, true)
}

// RotateKey adds publicKey to user and revokes oldKeyID (admin).
func (c *Client) RotateKey(ctx context.Context, user, oldKeyID, publicKey string) (*User, error) {
	var u User
	return &u, c.do(ctx, "POST", "/v1/users/"+url.PathEscape(user)+"/keys/rotate", map[string]string{"old_key_id": oldKeyID, "public_key": publicKey}, &u, true)
}

// SetDisabled disables or re-enables a user (admin).
func (c *Client) SetDisabled(ctx context.Context, user string, disabled bool) (*User, error) {
	op := "enable"
	if disabled {
		op = "disable"
	}
	var u User
	return &u, c.do(ctx, "POST", "/v1/users/"+url.PathEscape(user)+"/"+op, nil, &u, true)
}

// Audit returns the newest admin writes (admin).
func (c *Client) Audit(ctx context.Context) ([]AuditEntry, error) {
	var out []AuditEntry
	return out, c.do(ctx, "GET", "/v1/audit", nil, &out, true)
}

// GetKey returns one key.
func (c *Client) GetKey(ctx context.Context, id string) (*Key, error) {
	var k Key
	return &k, c.do(ctx, "GET", "/v1/keys?id="+url.QueryEscape(id), nil, &k, false)
}

// OpenAPI returns the ledger's OpenAPI document.
func (c *Client) OpenAPI(ctx context.Context) ([]byte, error) {
	var raw []byte
	err := c.do(ctx, "GET", "/v1/openapi.yaml", nil, rawReply{&raw}, false)
	return raw, err
}

// rawReply takes a reply body as it is.
type rawReply struct{ b *[]byte }

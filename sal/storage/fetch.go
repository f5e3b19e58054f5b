package storage

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"syscall"
	"time"
)

// DefaultMaxImageBytes bounds one image download: a server that sends
// without end must not fill the pool every tenant shares.
const DefaultMaxImageBytes = 64 << 30

// maxRedirects bounds the redirects one image download follows.
const maxRedirects = 5

// ErrImageRefused marks an image URL, address or size the pool's policy
// refuses.
var ErrImageRefused = errors.New("image fetch refused")

// blocked are the address ranges an image download never reaches unless
// Config.ImageAllow names them: the node's own and its private side
// (loopback, private, link-local such as cloud metadata, CGNAT, multicast,
// unspecified and reserved ranges).
var blocked = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("240.0.0.0/4"),
	netip.MustParsePrefix("64:ff9b::/96"), // NAT64 reaches IPv4 ranges
	netip.MustParsePrefix("fc00::/7"),
}

// ImagePolicy says which addresses image downloads may reach besides
// public ones: loopback, private, link-local, multicast and reserved
// addresses are refused unless a range or a server names them.
type ImagePolicy struct {
	// Ranges are allowed whole (any port).
	Ranges []netip.Prefix
	// Servers are allowed one address and port each (writ dev names its
	// own file server, so nothing else on loopback is reachable).
	Servers []netip.AddrPort
}

// ParseImageAllow reads one --image-allow value: a range (10.0.0.0/8,
// 127.0.0.1/32) or a server (127.0.0.1:7706).
func (p *ImagePolicy) ParseImageAllow(s string) error {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		p.Servers = append(p.Servers, ap)
		return nil
	}
	if pr, err := netip.ParsePrefix(s); err == nil {
		p.Ranges = append(p.Ranges, pr.Masked())
		return nil
	}
	return fmt.Errorf("%q is neither an address range (10.0.0.0/8) nor a server (127.0.0.1:7706)", s)
}

func (p ImagePolicy) allows(ap netip.AddrPort) bool {
	a := ap.Addr().Unmap()
	for _, s := range p.Servers {
		if s.Addr().Unmap() == a && s.Port() == ap.Port() {
			return true
		}
	}
	return allowedAddr(a, p.Ranges)
}

// allowedAddr reports whether an image download may connect to a.
func allowedAddr(a netip.Addr, allow []netip.Prefix) bool {
	a = a.Unmap()
	for _, p := range allow {
		if p.Contains(a) {
			return true
		}
	}
	if a.IsLoopback() || a.IsPrivate() || a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() ||
		a.IsInterfaceLocalMulticast() || a.IsMulticast() || a.IsUnspecified() {
		return false
	}
	for _, p := range blocked {
		if p.Contains(a) {
			return false
		}
	}
	return true
}

// checkImageURL accepts http and https URLs with a host.
func checkImageURL(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
		return nil, fmt.Errorf("%w: %q is not an http(s) URL without credentials", ErrImageRefused, raw)
	}
	return u, nil
}

// imageClient is the HTTP client of image downloads. Every connection it
// makes, redirects included, is checked where the address is final (the
// dialer's Control, after DNS), so a name that resolves to a private
// address, or changes its answer between checks, is refused too. It uses
// no proxy from the environment: a proxy would make the connection, not
// this check.
func imageClient(policy ImagePolicy) *http.Client {
	dialer := &net.Dialer{
		Timeout: 30 * time.Second,
		Control: func(network, address string, _ syscall.RawConn) error {
			ap, err := netip.ParseAddrPort(address)
			if err != nil {
				return fmt.Errorf("%w: address %s", ErrImageRefused, address)
			}
			if !policy.allows(ap) {
				return fmt.Errorf("%w: %s is a loopback, private, link-local or reserved address (a runner's --image-allow can permit it)", ErrImageRefused, ap)
			}
			return nil
		},
	}
	return &http.Client{
		Transport: &http.Transport{
			Proxy:                 nil,
			DialContext:           dialer.DialContext,
			TLSHandshakeTimeout:   30 * time.Second,
			ResponseHeaderTimeout: time.Minute,
			MaxIdleConnsPerHost:   2,
		},
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= maxRedirects {
				return fmt.Errorf("%w: more than %d redirects", ErrImageRefused, maxRedirects)
			}
			_, err := checkImageURL(req.URL.String())
			return err
		},
	}
}

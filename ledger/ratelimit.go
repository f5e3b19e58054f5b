package ledger

import (
	"fmt"
	"net"
	"net/http"
	"sync"

	"golang.org/x/time/rate"

	"github.com/writ-fleet/writ/internal/httpapi"
)

// Per-source rate limits of the endpoints strangers reach. A source is a
// client IP address.
//
//   - limitRegister: every registration attempt counts (registrations
//     are rare; a flood of bad tokens is not).
//   - limitNode: failed node requests count (a bad signature, an unknown
//     node), so a large fleet behind one NAT reports freely while a
//     stranger's garbage is throttled.
const (
	limitRegister = iota
	limitNode
	limitAdmin
	nLimits
)

// RateLimit is one limit: events per second and burst.
type RateLimit struct {
	Rate  float64
	Burst int
}

// DefaultRateLimits are the limits of NewServer, per source.
var DefaultRateLimits = [nLimits]RateLimit{
	limitRegister: {Rate: 5, Burst: 50},
	limitNode:     {Rate: 20, Burst: 200},
	limitAdmin:    {Rate: 20, Burst: 200},
}

// NoRateLimits turns every per-source limit off (a benchmark whose
// simulated fleet shares one address).
var NoRateLimits [nLimits]RateLimit

// maxSources bounds the limiter table; past it the table starts afresh
// (a flood from many addresses gets a fresh allowance, not memory).
const maxSources = 65536

type limiters struct {
	mu     sync.Mutex
	limits [nLimits]RateLimit
	by     [nLimits]map[string]*rate.Limiter // guarded by mu
}

func newLimiters(l [nLimits]RateLimit) *limiters {
	ls := &limiters{limits: l}
	for i := range ls.by {
		ls.by[i] = map[string]*rate.Limiter{}
	}
	return ls
}

func source(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

func (ls *limiters) get(kind int, r *http.Request) *rate.Limiter {
	src := source(r)
	ls.mu.Lock()
	defer ls.mu.Unlock()
	m := ls.by[kind]
	l := m[src]
	if l == nil {
		if len(m) >= maxSources {
			m = map[string]*rate.Limiter{}
			ls.by[kind] = m
		}
		lim := ls.limits[kind]
		l = rate.NewLimiter(rate.Limit(lim.Rate), lim.Burst)
		m[src] = l
	}
	return l
}

// allow takes one event of kind from r's source and reports whether the
// source was within its rate.
func (ls *limiters) allow(kind int, r *http.Request) bool {
	if ls.limits[kind].Rate <= 0 {
		return true
	}
	return ls.get(kind, r).Allow()
}

// ok reports whether r's source has allowance left, taking none.
func (ls *limiters) ok(kind int, r *http.Request) bool {
	if ls.limits[kind].Rate <= 0 {
		return true
	}
	return ls.get(kind, r).Tokens() >= 1
}

func tooMany(what string) error {
	return &httpapi.Error{Status: http.StatusTooManyRequests, Reason: "rate_limited", Msg: fmt.Sprintf("too many %ss from this address; slow down", what)}
}

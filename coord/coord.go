// Package coord is writ's front door. It accepts signed jobs and flows over HTTP,
// checks them early (structure, known site, known keys), routes each to its
// site's supervisor (address from the ledger), records every job's state in
// its own Redis, follows each site's event stream to keep those states
// current, and redelivers with backoff while a supervisor is unreachable.
// coord holds no state outside Redis, so a restarted coord loses nothing and
// several can run behind a load balancer.
//
// # HTTP API
//
//	POST /v1/jobs                  DSSE envelope → 202 {id, state} (queued or pending), or 4xx {error, reason, id};
//	                               ?wait=30s answers 200 with the job's record once it ends (or the wait passes)
//	GET  /v1/jobs/{id}             the job's record; ?wait=30s blocks until it ends (or the wait passes)
//	GET  /v1/jobs/{id}/events      server-sent events: history, then live, until the job ends
//	GET  /v1/jobs                  ?state=&site=&limit=&before= newest first; {jobs, next}
//	POST /v1/jobs/{id}/cancel      cancel a job the caller signed (or of a site it administers)
//	POST /v1/flows                 a signed flow envelope → 202 {id, state}, or 4xx {error, reason, id}
//	GET  /v1/flows/{id}            the flow's progress and outputs; /events streams its step summaries
//	GET  /v1/flows                 the caller's flows; POST /v1/flows/{id}/cancel stops one
//
// openapi.yaml (OpenAPI) is the full description.
//
// # Background duties
//
// Each is its own type and file, built from a params struct of exactly
// what it uses, and run under Coord.Run (which writes down the shutdown
// order): forwarder (one per site, batches submissions to the supervisor),
// follower (one per site, applies the site's events to job records),
// deliverer (retries pending deliveries), the flow engine (runs flows:
// flowengine.go), and hub (wakes waiters when their job changes).
package coord

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"

	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/verify"
)

// Defaults for Params.
const (
	DefaultSiteRefresh = 5 * time.Second
)

// Params are coord's dependencies.
type Params struct {
	Redis  *queue.Redis       // required: coord's own Redis
	Ledger *ledger.Client     // required: sites
	Trust  verify.TrustSource // required (a *ledger.TrustCache): coord verifies jobs before it routes them
	Log    *slog.Logger       // required
	// Metrics is the registry to report to; nil means a new one.
	Metrics *prometheus.Registry
	// HTTP calls supervisors; nil means a client with sensible timeouts.
	HTTP *http.Client
	// Retention is how long job records are kept; zero means
	// queue.DefaultJobRetention.
	Retention time.Duration
	// SiteRefresh is how often the site list is read from the ledger; zero
	// means DefaultSiteRefresh.
	SiteRefresh time.Duration
	// Placement is the policy for jobs that state resources and pin no
	// node: PlaceSpread (default) or PlaceBinpack.
	Placement string
	// StreamsPerUser bounds one user's open event streams and waits; zero
	// means DefaultStreamsPerUser.
	StreamsPerUser int
	// Authorities are the names (host, or host:port) signed requests must
	// be addressed to (the RFC 9421 @authority): a request signed for
	// another server is refused. Empty accepts any.
	Authorities []string
	// ID names this coord among the coords sharing its Redis (leases, and
	// the events it tells the others about); empty means host and pid
	// with a random suffix.
	ID  string
	Now func() time.Time // optional, time.Now
}

// LeaseTTL is how long a coord holds a per-site duty (following a site's
// events) or redelivery without renewing it; it renews every LeaseTTL/5,
// and another coord takes over within about LeaseTTL of its death.
var LeaseTTL = 5 * time.Second

// Coord is the front door. Its background duties are the fields below the
// API's own state; Run starts them all and they end with it.
type Coord struct {
	p       Params
	metrics *metrics
	placer  *placer // placement and reservations (no goroutine)
	auth    *auth   // who signs each request, and their open streams

	hub       *hub       // wakes waiters when the follower applied an event
	deliverer *deliverer // redelivers pending jobs

	mu          sync.Mutex
	sites       map[string]ledger.Site // guarded by mu
	forwarders  map[string]*forwarder  // guarded by mu; one per site, started on first use
	followers   map[string]bool        // guarded by mu; one per site, started by discover
	siteLookups singleflight.Group
	runCtx      context.Context // guarded by mu; set by Run: forwarders and followers run under it
	group       *errgroup.Group // guarded by mu; set by Run
	running     chan struct{}   // closed once Run has set runCtx and group

	flows *flowEngine // runs flows
}

type metrics struct {
	submitted  *prometheus.CounterVec
	deliveries *prometheus.CounterVec
	applied    prometheus.Counter
	batchSize  prometheus.Histogram
}

// New returns a Coord; call Run to start its background duties.
func New(p Params) (*Coord, error) {
	if p.Redis == nil || p.Ledger == nil || p.Trust == nil || p.Log == nil {
		return nil, errors.New("coord: Redis, Ledger, Trust and Log are required")
	}
	if p.Metrics == nil {
		p.Metrics = prometheus.NewRegistry()
	}
	if p.HTTP == nil {
		p.HTTP = &http.Client{Transport: &http.Transport{
			MaxIdleConnsPerHost: 64,
			IdleConnTimeout:     90 * time.Second,
		}}
	}
	if p.SiteRefresh == 0 {
		p.SiteRefresh = DefaultSiteRefresh
	}
	if p.Now == nil {
		p.Now = time.Now
	}
	if p.ID == "" {
		host, _ := os.Hostname()
		var b [4]byte
		rand.Read(b[:])
		p.ID = fmt.Sprintf("%s:%d:%x", host, os.Getpid(), b)
	}
	switch p.Placement {
	case "":
		p.Placement = PlaceSpread
	case PlaceSpread, PlaceBinpack:
	default:
		return nil, fmt.Errorf("coord: placement %q: want %s or %s", p.Placement, PlaceSpread, PlaceBinpack)
	}
	c := &Coord{
		p:          p,
		hub:        newHub(),
		forwarders: map[string]*forwarder{},
		followers:  map[string]bool{},
		running:    make(chan struct{}),
		metrics: &metrics{
			submitted: prometheus.NewCounterVec(prometheus.CounterOpts{
				Name: "writ_coord_jobs_total", Help: "Jobs submitted to coord, by first state and reason.",
			}, []string{"state", "reason"}),
			deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
				Name: "writ_coord_deliveries_total", Help: "Batches sent to supervisors, by site and outcome.",
			}, []string{"site", "outcome"}),
			applied: prometheus.NewCounter(prometheus.CounterOpts{
				Name: "writ_coord_events_applied_total", Help: "Site events applied to job records.",
			}),
			batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
				Name: "writ_coord_batch_size", Help: "Envelopes per batch sent to a supervisor.",
				Buckets: prometheus.ExponentialBuckets(1, 2, 10),
			}),
		},
	}
	p.Metrics.MustRegister(c.metrics.submitted, c.metrics.deliveries, c.metrics.applied, c.metrics.batchSize)
	c.deliverer = &deliverer{p: delivererParams{redis: p.Redis, post: c.post, now: p.Now, log: p.Log}}
	c.placer = newPlacer(p.Ledger, p.Placement, p.Now)
	c.auth = newAuth(p.Ledger, p.Now, p.StreamsPerUser, p.Authorities)
	c.flows = newFlowEngine(flowEngineParams{redis: p.Redis, submit: c.submitTo, notify: c.notifyFlows, leased: c.leased,
		log: p.Log, now: p.Now, retention: p.Retention})
	return c, nil
}

// applied is what the followers call after applying a batch of events:
// count them, wake their waiters, end the placements of jobs that ended.
func (c *Coord) applied(evs []job.Event) {
	c.metrics.applied.Add(float64(len(evs)))
	c.wake(evs)
	// Steps of flows advance their flows; off the follower's path (a lost
	// advance is the sweep's). The follower reuses evs once this returns:
	// ended copies the ends.
	c.flows.ended(evs)
	// The other coords' waiters and streams hear of it too.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := c.p.Redis.PublishApplied(ctx, c.p.ID, evs); err != nil {
		c.p.Log.Warn("tell the other coords of applied events (their waiters re-read within 5 s)", "err", err)
	}
}

// wake tells this coord's waiters and streams of events applied.
func (c *Coord) wake(evs []job.Event) {
	for _, ev := range evs {
		c.hub.publish(ev)
		if ev.Type.Terminal() {
			c.placer.release(ev.Job)
		}
	}
}

// leased runs fn while this coord holds the lease called name: it tries to
// take it every LeaseTTL/5, renews it as often while fn runs, and ends fn
// (cancelling its context, waiting for it) as soon as a renewal fails, so
// one coord at a time does the duty, and another takes over within about
// LeaseTTL when its holder dies.
func (c *Coord) leased(ctx context.Context, name string, fn func(context.Context)) {
	every := LeaseTTL / 5
	for ctx.Err() == nil {
		ok, err := c.p.Redis.TakeLease(ctx, name, c.p.ID, LeaseTTL)
		if err != nil && ctx.Err() == nil {
			c.p.Log.Warn("take lease", "lease", name, "err", err)
		}
		if ok {
			c.p.Log.Info("holding lease", "lease", name, "coord", c.p.ID)
			dctx, stop := context.WithCancel(ctx)
			done := make(chan struct{})
			go func() { defer close(done); fn(dctx) }()
			t := time.NewTicker(every)
		hold:
			for {
				select {
				case <-done:
					break hold
				case <-t.C:
					if ok, err := c.p.Redis.TakeLease(ctx, name, c.p.ID, LeaseTTL); !ok || err != nil {
						if ctx.Err() == nil {
							c.p.Log.Warn("lost lease; another coord takes over", "lease", name, "err", err)
						}
						break hold
					}
				}
			}
			t.Stop()
			stop()
			<-done
			if ctx.Err() != nil {
				// Shutting down: let another coord take over at once.
				dropCtx, cancel := context.WithTimeout(context.Background(), time.Second)
				c.p.Redis.DropLease(dropCtx, name, c.p.ID)
				cancel()
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
	}
}

// Run runs the background duties until ctx ends or one fails: site
// discovery (which starts a follower per site), a forwarder per site
// (started by the first job for it), the deliverer and the flow engine.
//
// Shutdown order, once ctx ends: the HTTP server (outside Coord) stops
// taking requests; each forwarder finishes the batches in flight and
// records what is still waiting as pending, so it is delivered later by
// the deliverer of this or another coord (nothing handed over is lost); the
// followers stop reading (their cursors are in Redis: a restart resumes
// there); the deliverer stops between rounds; the flow engine stops
// applying step ends (those still queued are the next sweep's: the jobs'
// records hold them). Run returns when all have.
func (c *Coord) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	c.mu.Lock()
	c.runCtx, c.group = ctx, g
	c.mu.Unlock()
	close(c.running)
	g.Go(func() error {
		c.leased(ctx, "deliver", func(ctx context.Context) { c.deliverer.run(ctx) })
		return nil
	})
	g.Go(func() error { return c.flows.run(ctx) })
	g.Go(func() error { return c.discover(ctx) })
	g.Go(func() error {
		c.p.Redis.SubscribeApplied(ctx, func(m queue.AppliedMessage) {
			if m.From != c.p.ID {
				c.wake(m.Events)
				for _, id := range m.Flows {
					c.hub.publish(job.Event{Job: flowKey(id)})
				}
			}
		})
		return nil
	})
	return g.Wait()
}

// discover reads the site list from the ledger periodically and starts a
// follower for each new site.
func (c *Coord) discover(ctx context.Context) error {
	t := time.NewTicker(c.p.SiteRefresh)
	defer t.Stop()
	for {
		if _, err := c.refreshSites(ctx); err != nil {
			c.p.Log.Warn("read sites from ledger", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func (c *Coord) refreshSites(ctx context.Context) (map[string]ledger.Site, error) {
	list, err := c.p.Ledger.Sites(ctx)
	if err != nil {
		return nil, err
	}
	sites := make(map[string]ledger.Site, len(list))
	for _, s := range list {
		sites[s.Name] = s
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sites = sites
	for name := range sites {
		if c.followers[name] || c.group == nil {
			continue
		}
		c.followers[name] = true
		f := &follower{p: followerParams{site: name, redis: c.p.Redis, url: c.supervisorURL, http: c.p.HTTP,
			applied: c.applied, log: c.p.Log, retention: c.p.Retention}}
		ctx := c.runCtx
		c.group.Go(func() error { c.leased(ctx, "follow:"+name, f.run); return nil })
	}
	return sites, nil
}

// site returns a site by name. A name coord does not know is looked up in
// the ledger before it is refused, so a site used right after it was
// created works; concurrent lookups share one ledger call.
func (c *Coord) site(ctx context.Context, name string) (ledger.Site, bool, error) {
	c.mu.Lock()
	s, ok := c.sites[name]
	c.mu.Unlock()
	if ok {
		return s, true, nil
	}
	v, err, _ := c.siteLookups.Do("sites", func() (any, error) { return c.refreshSites(ctx) })
	if err != nil {
		return ledger.Site{}, false, err
	}
	s, ok = v.(map[string]ledger.Site)[name]
	return s, ok, nil
}

// supervisorURL returns the current supervisor address of a site.
func (c *Coord) supervisorURL(site string) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s, ok := c.sites[site]
	if !ok {
		return "", fmt.Errorf("site %s is not known to the ledger", site)
	}
	return s.SupervisorURL, nil
}

// submitTo hands sub to site's forwarder and waits for its verdict.
func (c *Coord) submitTo(ctx context.Context, site string, sub *submission) (job.Verdict, error) {
	f, err := c.forwarderFor(ctx, site)
	if err != nil {
		return job.Verdict{}, err
	}
	return f.submit(ctx, sub)
}

// forwarderFor returns the site's forwarder, starting it under Run on
// first use. Before Run has started it waits for it (or ctx).
func (c *Coord) forwarderFor(ctx context.Context, site string) (*forwarder, error) {
	select {
	case <-c.running:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	f, ok := c.forwarders[site]
	if !ok {
		f = newForwarder(forwarderParams{site: site, post: c.post, redis: c.p.Redis, log: c.p.Log, retention: c.p.Retention})
		c.forwarders[site] = f
		ctx := c.runCtx
		c.group.Go(func() error { return f.run(ctx) })
	}
	return f, nil
}

// Ready checks coord's Redis and the ledger.
func (c *Coord) Ready(ctx context.Context) error {
	if err := c.p.Redis.Ping(ctx); err != nil {
		return err
	}
	_, err := c.p.Ledger.Sites(ctx)
	return err
}

package coord

import (
	"context"
	"fmt"
	"github.com/writ-fleet/writ/job"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/verify"
)

// Placement policies.
const (
	// PlaceSpread puts a job on the fitting node with the most free CPUs
	// (then memory): load spreads across the site.
	PlaceSpread = "spread"
	// PlaceBinpack puts a job on the fitting node with the fewest free
	// CPUs (then memory): nodes fill up one by one, others stay free.
	PlaceBinpack = "binpack"
)

// nodesTTL is how long the placer trusts its copy of a site's nodes.
const nodesTTL = 2 * time.Second

// placer picks a node for jobs that state resources but pin no node. It
// counts a node's free capacity as its capacity minus what its last uptime
// report says is used minus what coord itself has placed there and not yet
// seen end (reservations, released at the job's terminal event).
type placer struct {
	ledger *ledger.Client
	policy string
	now    func() time.Time

	mu       sync.Mutex
	nodes    map[string][]ledger.Node   // guarded by mu; by site
	fetched  map[string]time.Time       // guarded by mu
	reserved map[string]reservation     // guarded by mu; by job ID
	byNode   map[string]ledger.Capacity // guarded by mu; reserved per node
}

type reservation struct {
	node string
	need ledger.Capacity
}

func newPlacer(l *ledger.Client, policy string, now func() time.Time) *placer {
	return &placer{ledger: l, policy: policy, now: now, nodes: map[string][]ledger.Node{}, fetched: map[string]time.Time{},
		reserved: map[string]reservation{}, byNode: map[string]ledger.Capacity{}}
}

func need(r envelope.Resources) ledger.Capacity {
	return ledger.Capacity{CPUs: r.CPU, MemoryMiB: int64(r.MemoryMB), DiskGiB: int64(r.DiskGB)}
}

// siteNodes returns the site's nodes, from the ledger at most every nodesTTL.
func (p *placer) siteNodes(ctx context.Context, site string) ([]ledger.Node, error) {
	p.mu.Lock()
	if nodes, ok := p.nodes[site]; ok && p.now().Sub(p.fetched[site]) < nodesTTL {
		p.mu.Unlock()
		return nodes, nil
	}
	p.mu.Unlock()
	nodes, err := p.ledger.Nodes(ctx, site)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	p.nodes[site], p.fetched[site] = nodes, p.now()
	p.mu.Unlock()
	return nodes, nil
}

// place picks a node of site for job id and reserves what it needs. When
// no node fits, the error says why each was passed over.
func (p *placer) place(ctx context.Context, site, id string, res envelope.Resources) (string, error) {
	nodes, err := p.siteNodes(ctx, site)
	if err != nil {
		return "", fmt.Errorf("read the nodes of site %s: %w", site, err)
	}
	want := need(res)
	p.mu.Lock()
	defer p.mu.Unlock()
	if r, ok := p.reserved[id]; ok {
		return r.node, nil // a resubmission of a job already placed
	}
	type fit struct {
		id   string
		free ledger.Capacity
	}
	var fits []fit
	var why []string
	for _, n := range nodes {
		if n.Liveness != ledger.LivenessOnline {
			why = append(why, n.ID+" is "+n.Liveness)
			continue
		}
		r := p.byNode[n.ID]
		free := ledger.Capacity{
			CPUs:      n.Capacity.CPUs - n.Used.CPUs - r.CPUs,
			MemoryMiB: n.Capacity.MemoryMiB - n.Used.MemoryMiB - r.MemoryMiB,
			DiskGiB:   n.Capacity.DiskGiB - n.Used.DiskGiB - r.DiskGiB,
		}
		switch {
		case want.CPUs > free.CPUs:
			why = append(why, fmt.Sprintf("%s has %d free CPUs", n.ID, free.CPUs))
		case want.MemoryMiB > free.MemoryMiB:
			why = append(why, fmt.Sprintf("%s has %d MiB free memory", n.ID, free.MemoryMiB))
		case want.DiskGiB > 0 && want.DiskGiB > free.DiskGiB:
			why = append(why, fmt.Sprintf("%s has %d GiB free disk", n.ID, free.DiskGiB))
		default:
			fits = append(fits, fit{n.ID, free})
		}
	}
	if len(fits) == 0 {
		if len(nodes) == 0 {
			return "", fmt.Errorf("site %s has no registered nodes", site)
		}
		return "", fmt.Errorf("no node of site %s has %d CPUs and %d MiB free: %s", site, want.CPUs, want.MemoryMiB, strings.Join(why, "; "))
	}
	sort.SliceStable(fits, func(i, j int) bool {
		a, b := fits[i].free, fits[j].free
		if p.policy == PlaceBinpack {
			a, b = b, a
		}
		if a.CPUs != b.CPUs {
			return a.CPUs > b.CPUs
		}
		if a.MemoryMiB != b.MemoryMiB {
			return a.MemoryMiB > b.MemoryMiB
		}
		return fits[i].id < fits[j].id
	})
	chosen := fits[0].id
	p.reserved[id] = reservation{node: chosen, need: want}
	r := p.byNode[chosen]
	r.CPUs += want.CPUs
	r.MemoryMiB += want.MemoryMiB
	r.DiskGiB += want.DiskGiB
	p.byNode[chosen] = r
	return chosen, nil
}

// release ends job id's reservation (at its terminal event, or when it was
// not admitted). Releasing twice is harmless.
func (p *placer) release(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	r, ok := p.reserved[id]
	if !ok {
		return
	}
	delete(p.reserved, id)
	c := p.byNode[r.node]
	c.CPUs -= r.need.CPUs
	c.MemoryMiB -= r.need.MemoryMiB
	c.DiskGiB -= r.need.DiskGiB
	p.byNode[r.node] = c
}

// chooseSite picks a site for a job that allows any: the first, by name
// (its own Site first, as a preference), whose signing policy the job's
// signatures satisfy and, when it states resources, where a node has room
// (that node is returned too, and reserved). The error says why each site
// was passed over. users are the signers that counted there.
func (c *Coord) chooseSite(ctx context.Context, env *envelope.Envelope, spec *envelope.Job, id string) (site, node string, users []string, err error) {
	sites, err := c.refreshSites(ctx)
	if err != nil {
		return "", "", nil, fmt.Errorf("read sites from the ledger: %w", err)
	}
	names := make([]string, 0, len(sites))
	for n := range sites {
		if n != spec.Site {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	if _, ok := sites[spec.Site]; ok {
		names = append([]string{spec.Site}, names...)
	}
	var why []string
	capacity := false
	for _, name := range names {
		checked, err := verify.Envelope(ctx, c.p.Trust, env, spec, verify.Target{Site: name}, c.p.Now())
		if err != nil {
			why = append(why, name+": "+err.Error())
			continue
		}
		if (spec.Resources == envelope.Resources{}) {
			return name, "", checked.Signers, nil
		}
		node, err := c.placer.place(ctx, name, id, spec.Resources)
		if err == nil {
			return name, node, checked.Signers, nil
		}
		capacity = true
		why = append(why, name+": "+err.Error())
	}
	reason := job.ReasonBelowThreshold
	if capacity {
		reason = job.ReasonNoCapacity
	}
	if len(names) == 0 {
		why = append(why, "the ledger has no sites")
	}
	return "", "", nil, envelope.Refuse(reason, "no site takes this job: "+strings.Join(why, "; "))
}

package queue

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/writ-fleet/writ/envelope"
)

// A flow's steps share its envelope (up to envelope.MaxFlowBytes): a site
// keeps it once, by the flow's ID, and each step's task names it
// ("flow_ref", see verify.StepTask) instead of carrying it. Work puts it
// back into the payload it delivers, so a runner (or a dispatcher's node)
// checks the step against the envelope as signed. The key is not trusted
// any more than the task: the flow's ID is its payload's hash, and the
// step's job ID is derived from it.

// siteFlowKey holds flow id's envelope in site's Redis.
func siteFlowKey(site, id string) string { return "writ:site:" + site + ":flow:" + id }

// FlowKeep is how long past its expiry a site keeps a flow's envelope (no
// step of it starts after it expires; a run under way may still be
// delivered again).
const FlowKeep = time.Hour

// StoreSiteFlows keeps each flow envelope (by ID) in site's Redis until
// its expiry plus FlowKeep, in one round trip; one already kept is left
// as it is.
func (r *Redis) StoreSiteFlows(ctx context.Context, site string, flows map[string]SiteFlow) error {
	if len(flows) == 0 {
		return nil
	}
	pipe := r.rdb.Pipeline()
	for id, f := range flows {
		pipe.SetArgs(ctx, siteFlowKey(site, id), f.Envelope, redis.SetArgs{Mode: "NX", ExpireAt: f.Expires.Add(FlowKeep)})
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return fmt.Errorf("queue: keep flows: %w", err)
	}
	return nil
}

// SiteFlow is a flow envelope a site keeps.
type SiteFlow struct {
	Envelope []byte
	Expires  time.Time
}

// SiteFlowEnvelope returns the envelope of flow id that site keeps
// (ErrNoFlow if none).
func (r *Redis) SiteFlowEnvelope(ctx context.Context, site, id string) ([]byte, error) {
	b, err := r.rdb.Get(ctx, siteFlowKey(site, id)).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, ErrNoFlow
	}
	if err != nil {
		return nil, fmt.Errorf("queue: read flow %s: %w", id, err)
	}
	return b, nil
}

// flowRefOf returns the flow a step task's payload names instead of
// carrying ("" for any other payload). The member names are
// verify.StepTask's.
func flowRefOf(payload []byte) (string, map[string]json.RawMessage) {
	// Every delivery passes here: a job's envelope (its payload base64)
	// cannot hold the member name, so it is not decoded.
	if !bytes.Contains(payload, []byte(`"flow_ref"`)) {
		return "", nil
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(payload, &m) != nil {
		return "", nil
	}
	var ref string
	if _, has := m["flow"]; has || json.Unmarshal(m["flow_ref"], &ref) != nil {
		return "", nil
	}
	return ref, m
}

// flowCache keeps the flow envelopes a worker read, by ID, up to
// flowCacheBytes (a fan-out's items share one read).
type flowCache struct {
	mu    sync.Mutex
	byID  map[string][]byte // guarded by mu
	bytes int               // guarded by mu
}

const flowCacheBytes = 64 << 20

func (c *flowCache) get(id string) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.byID[id]
}

func (c *flowCache) put(id string, b []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.byID == nil || c.bytes+len(b) > flowCacheBytes {
		c.byID, c.bytes = map[string][]byte{}, 0
	}
	c.byID[id] = b
	c.bytes += len(b)
}

// expandFlow returns payload with the flow it names put back, read from
// site's Redis (or the cache). A payload that names no flow, or one the
// site no longer keeps, is returned as it is: the runner refuses a step
// without its flow, saying why.
func (r *Redis) expandFlow(ctx context.Context, cache *flowCache, site string, payload []byte) ([]byte, error) {
	ref, m := flowRefOf(payload)
	if ref == "" {
		return payload, nil
	}
	env := cache.get(ref)
	if env == nil {
		b, err := r.SiteFlowEnvelope(ctx, site, ref)
		switch {
		case errors.Is(err, ErrNoFlow):
			return payload, nil
		case err != nil:
			return nil, err
		}
		if flowIDOf(b) != ref {
			return nil, fmt.Errorf("queue: the envelope kept for flow %s is another flow's", ref)
		}
		cache.put(ref, b)
		env = b
	}
	m["flow"] = env
	delete(m, "flow_ref")
	return json.Marshal(m)
}

// flowIDOf is the ID of a flow envelope, or "" if it is not one.
func flowIDOf(raw []byte) string {
	env, err := envelope.Decode(raw)
	if err != nil {
		return ""
	}
	return env.ID()
}

package queue

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/writ-fleet/writ/job"
)

func leaseKey(name string) string { return "writ:coord:lease:" + name }

// takeLease takes the lease KEYS[1] for ARGV[1] (ms ARGV[2]), or extends it
// if ARGV[1] holds it already. It returns 1 when ARGV[1] holds it.
var takeLease = redis.NewScript(`
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if cur then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
`)

// dropLease deletes the lease KEYS[1] if ARGV[1] holds it.
var dropLease = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
`)

// TakeLease takes (or, for its holder, extends) the lease called name for
// owner, for ttl. It reports whether owner holds it now. coord uses leases
// so that one coord at a time follows a site and redelivers.
func (r *Redis) TakeLease(ctx context.Context, name, owner string, ttl time.Duration) (bool, error) {
	n, err := takeLease.Run(ctx, r.rdb, []string{leaseKey(name)}, owner, ttl.Milliseconds()).Int()
	if err != nil {
		return false, fmt.Errorf("lease %s: %w", name, err)
	}
	return n == 1, nil
}

// DropLease gives up owner's lease called name (a no-op if another holds it).
func (r *Redis) DropLease(ctx context.Context, name, owner string) error {
	return dropLease.Run(ctx, r.rdb, []string{leaseKey(name)}, owner).Err()
}

// LeaseHolder returns who holds the lease called name ("" for nobody).
func (r *Redis) LeaseHolder(ctx context.Context, name string) (string, error) {
	s, err := r.rdb.Get(ctx, leaseKey(name)).Result()
	if err == redis.Nil {
		return "", nil
	}
	return s, err
}

// appliedChannel carries the events one coord applied to the others, so
// each wakes its own waiters and streams.
const appliedChannel = "writ:coord:applied"

// maxAppliedMessage bounds one message on appliedChannel (Redis drops a
// subscriber whose output buffer passes 8 MiB for a minute).
const maxAppliedMessage = 256 << 10

// AppliedMessage is what coord publishes on appliedChannel.
type AppliedMessage struct {
	From   string      `json:"from"`
	Events []job.Event `json:"events,omitempty"`
	// Flows are flows whose progress changed (their streams re-read them).
	Flows []string `json:"flows,omitempty"`
}

// PublishFlows tells the other coords that the progress of flows ids
// changed.
func (r *Redis) PublishFlows(ctx context.Context, from string, ids []string) error {
	b, _ := json.Marshal(AppliedMessage{From: from, Flows: ids})
	return r.rdb.Publish(ctx, appliedChannel, b).Err()
}

// PublishApplied tells the other coords which events from applied, in
// messages of at most maxAppliedMessage bytes (an event larger than that
// goes alone, without its result: a waiter reads the record anyway).
func (r *Redis) PublishApplied(ctx context.Context, from string, evs []job.Event) error {
	pipe := r.rdb.Pipeline()
	var batch []job.Event
	size := 0
	flush := func() {
		if len(batch) == 0 {
			return
		}
		b, _ := json.Marshal(AppliedMessage{From: from, Events: batch})
		pipe.Publish(ctx, appliedChannel, b)
		batch, size = nil, 0
	}
	for _, ev := range evs {
		n := len(ev.Result) + len(ev.Message) + len(ev.Error) + 256
		if n > maxAppliedMessage {
			ev.Result = nil
			n = len(ev.Message) + len(ev.Error) + 256
		}
		if size+n > maxAppliedMessage {
			flush()
		}
		batch = append(batch, ev)
		size += n
	}
	flush()
	_, err := pipe.Exec(ctx)
	return err
}

// SubscribeApplied calls fn with every AppliedMessage published until ctx
// ends (reconnecting as go-redis does).
func (r *Redis) SubscribeApplied(ctx context.Context, fn func(AppliedMessage)) {
	ps := r.rdb.Subscribe(ctx, appliedChannel)
	defer ps.Close()
	ch := ps.Channel(redis.WithChannelSize(1024))
	for {
		select {
		case <-ctx.Done():
			return
		case msg, ok := <-ch:
			if !ok {
				return
			}
			var m AppliedMessage
			if json.Unmarshal([]byte(msg.Payload), &m) == nil {
				fn(m)
			}
		}
	}
}

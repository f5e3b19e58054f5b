package queue

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/writ-fleet/writ/job"
)

// EventStreamMaxLen bounds a site's event stream (approximately).
const EventStreamMaxLen = 1_000_000

func eventStream(site string) string { return "writ:site:" + site + ":events" }

// EndRetention is how long a site remembers that a job ended: as long as
// any copy of it can still be admitted (a job's validity is at most
// envelope.MaxValidity, 7 days) and a margin for clock skew.
const EndRetention = 7*24*time.Hour + time.Hour

func endKey(site, id string) string { return "writ:site:" + site + ":end:" + id }

// publishEnd publishes one job's events, the last batch of a run, which
// holds a terminal event: only if the job has not ended before. KEYS are
// the stream and the job's end key; ARGV the stream's max length, the end
// key's TTL (ms), the terminal event's type, then the events' JSON.
// It returns 1 when published, 0 when the job had already ended (nothing
// is published: a job completes once).
var publishEnd = redis.NewScript(`
if not redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[2]) then return 0 end
for i = 4, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i])
end
return 1
`)

// Publish appends events to site's stream in one round trip. A job's first
// terminal event (succeeded, failed, rejected) also records that the job
// ended (for EndRetention); a later terminal event of the same job, from a
// run that should not have happened (a lease recovered after the end was
// published, a redelivery), is dropped with the events sent along with it,
// so a job is seen to complete once. See Ended.
func (r *Redis) Publish(ctx context.Context, site string, events ...job.Event) error {
	if len(events) == 0 {
		return nil
	}
	var plain []job.Event
	ends := map[string][]job.Event{} // jobs with a terminal event: all their events here
	endType := map[string]job.EventType{}
	for _, ev := range events {
		if ev.Type.Terminal() {
			endType[ev.Job] = ev.Type
		}
	}
	for _, ev := range events {
		if _, ok := endType[ev.Job]; ok {
			ends[ev.Job] = append(ends[ev.Job], ev)
		} else {
			plain = append(plain, ev)
		}
	}
	err := r.execScripts(ctx, func(pipe redis.Pipeliner) {
		publishPipe(ctx, pipe, site, plain)
		for id, evs := range ends {
			args := []any{EventStreamMaxLen, EndRetention.Milliseconds(), string(endType[id])}
			for _, ev := range evs {
				ev.Seq = ""
				b, _ := json.Marshal(ev)
				args = append(args, string(b))
			}
			publishEnd.Run(ctx, pipe, []string{eventStream(site), endKey(site, id)}, args...)
		}
	})
	if err != nil {
		return fmt.Errorf("publish events: %w", err)
	}
	return nil
}

// Ended reports, for each job ID, whether site has published its end (see
// Publish), in one round trip.
func (r *Redis) Ended(ctx context.Context, site string, ids ...string) ([]bool, error) {
	pipe := r.rdb.Pipeline()
	cmds := make([]*redis.IntCmd, len(ids))
	for i, id := range ids {
		cmds[i] = pipe.Exists(ctx, endKey(site, id))
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, fmt.Errorf("read job ends: %w", err)
	}
	out := make([]bool, len(ids))
	for i, c := range cmds {
		out[i] = c.Val() > 0
	}
	return out, nil
}

func publishPipe(ctx context.Context, pipe redis.Pipeliner, site string, events []job.Event) {
	for _, ev := range events {
		ev.Seq = ""
		b, _ := json.Marshal(ev)
		pipe.XAdd(ctx, &redis.XAddArgs{
			Stream: eventStream(site),
			MaxLen: EventStreamMaxLen,
			Approx: true,
			Values: []string{"e", string(b)},
		})
	}
}

// RawEvent is an event as stored: its stream ID and its JSON (which has no
// seq field; Seq is the ID).
type RawEvent struct {
	Seq  string
	JSON []byte
}

// ReadRawEvents returns up to count events of site after seq ("0" for the
// start), waiting up to block for at least one, without decoding them. It
// returns no events and no error when block passes quietly.
func (r *Redis) ReadRawEvents(ctx context.Context, site, after string, count int64, block time.Duration) ([]RawEvent, error) {
	res, err := r.rdb.XRead(ctx, &redis.XReadArgs{
		Streams: []string{eventStream(site), after},
		Count:   count,
		Block:   block,
	}).Result()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read events of site %s: %w", site, err)
	}
	var out []RawEvent
	for _, s := range res {
		for _, m := range s.Messages {
			raw, _ := m.Values["e"].(string)
			out = append(out, RawEvent{Seq: m.ID, JSON: []byte(raw)})
		}
	}
	return out, nil
}

// ReadEvents is ReadRawEvents with the events decoded (entries that are not
// writ events are skipped).
func (r *Redis) ReadEvents(ctx context.Context, site, after string, count int64, block time.Duration) ([]job.Event, error) {
	raws, err := r.ReadRawEvents(ctx, site, after, count, block)
	if err != nil {
		return nil, err
	}
	out := make([]job.Event, 0, len(raws))
	for _, raw := range raws {
		var ev job.Event
		if err := json.Unmarshal(raw.JSON, &ev); err != nil {
			continue
		}
		ev.Seq = raw.Seq
		out = append(out, ev)
	}
	return out, nil
}

// LastEventSeq returns the ID of the newest event of site, or "0-0".
func (r *Redis) LastEventSeq(ctx context.Context, site string) (string, error) {
	msgs, err := r.rdb.XRevRangeN(ctx, eventStream(site), "+", "-", 1).Result()
	if err != nil {
		return "", err
	}
	if len(msgs) == 0 {
		return "0-0", nil
	}
	return msgs[0].ID, nil
}

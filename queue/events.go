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

// Publish appends events to site's stream in one round trip.
func (r *Redis) Publish(ctx context.Context, site string, events ...job.Event) error {
	if len(events) == 0 {
		return nil
	}
	pipe := r.rdb.Pipeline()
	publishPipe(ctx, pipe, site, events)
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("publish events: %w", err)
	}
	return nil
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

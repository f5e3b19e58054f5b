package coord

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/writ-fleet/writ/job"
)

// follower keeps job records of one site current: it follows the
// supervisor's event stream from the last event applied (the cursor in
// Redis), applies events in batches, and wakes waiters. Events are applied
// in stream order and re-applying is harmless, so a restart resumes exactly.
type follower struct {
	c    *Coord
	site string
}

// maxApply bounds the events applied in one round trip.
const maxApply = 512

func (f *follower) run(ctx context.Context) {
	backoff := 500 * time.Millisecond
	for ctx.Err() == nil {
		err := f.follow(ctx)
		if ctx.Err() != nil {
			return
		}
		f.c.p.Log.Warn("site event stream broke; reconnecting", "site", f.site, "err", err, "in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 10*time.Second)
	}
}

// follow reads the stream until it breaks.
func (f *follower) follow(ctx context.Context) error {
	cursor, err := f.c.p.Redis.Cursor(ctx, f.site)
	if err != nil {
		return err
	}
	base, err := f.c.supervisorURL(f.site)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v1/events?after="+url.QueryEscape(cursor), nil)
	if err != nil {
		return err
	}
	resp, err := f.c.p.HTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("supervisor answered HTTP %d", resp.StatusCode)
	}
	f.c.p.Log.Info("following site events", "site", f.site, "after", cursor)
	br := bufio.NewReaderSize(resp.Body, 64<<10)
	var batch []job.Event
	var data strings.Builder
	var id string
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			if len(batch) > 0 {
				f.apply(ctx, batch)
			}
			return fmt.Errorf("read event stream: %w", err)
		}
		line = strings.TrimRight(line, "\r\n")
		switch {
		case strings.HasPrefix(line, "id: "):
			id = line[len("id: "):]
		case strings.HasPrefix(line, "data: "):
			data.WriteString(line[len("data: "):])
		case line == "" && data.Len() > 0:
			var ev job.Event
			if err := json.Unmarshal([]byte(data.String()), &ev); err == nil && id != "" {
				ev.Seq = id
				batch = append(batch, ev)
			}
			data.Reset()
			id = ""
		}
		// Apply when the batch is full or nothing more is buffered: under
		// load that makes large batches, when idle it applies at once.
		if len(batch) >= maxApply || (len(batch) > 0 && br.Buffered() == 0) {
			if err := f.apply(ctx, batch); err != nil {
				return err
			}
			batch = batch[:0]
		}
	}
}

func (f *follower) apply(ctx context.Context, batch []job.Event) error {
	if err := f.c.p.Redis.ApplyEvents(ctx, f.site, batch, f.c.p.Retention); err != nil {
		return err
	}
	f.c.metrics.applied.Add(float64(len(batch)))
	for _, ev := range batch {
		f.c.hub.publish(ev)
		switch ev.Type {
		case job.EventSucceeded, job.EventFailed, job.EventRejected:
			f.c.placer.release(ev.Job)
		}
	}
	return nil
}

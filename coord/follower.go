package coord

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/queue"
)

// follower keeps job records of one site current: it follows the
// supervisor's event stream from the last event applied (the cursor in
// Redis), applies events in batches, and wakes waiters. Events are applied
// in stream order and re-applying is harmless, so a restart resumes exactly.
type follower struct {
	p followerParams
}

// followerParams are a follower's dependencies.
type followerParams struct {
	site  string                            // required
	redis *queue.Redis                      // required: cursor and job records
	url   func(site string) (string, error) // required: the site's supervisor address now
	http  *http.Client                      // required
	// applied is told about every batch once it is in Redis (coord wakes
	// waiters and ends placements there). Required.
	applied func(evs []job.Event)
	log     *slog.Logger // required
	// retention is how long job records are kept; zero means
	// queue.DefaultJobRetention.
	retention time.Duration
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
		f.p.log.Warn("site event stream broke; reconnecting", "site", f.p.site, "err", err, "in", backoff)
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
	cursor, err := f.p.redis.Cursor(ctx, f.p.site)
	if err != nil {
		return err
	}
	base, err := f.p.url(f.p.site)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v1/events?after="+url.QueryEscape(cursor), nil)
	if err != nil {
		return err
	}
	resp, err := f.p.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("supervisor answered HTTP %d", resp.StatusCode)
	}
	f.p.log.Info("following site events", "site", f.p.site, "after", cursor)
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
	if err := f.p.redis.ApplyEvents(ctx, f.p.site, batch, f.p.retention); err != nil {
		return err
	}
	f.p.applied(batch)
	return nil
}

package coord

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
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

// maxEventBytes bounds one event of the stream (results and errors are
// far smaller: 64 KiB by default).
const maxEventBytes = 8 << 20

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

	// One goroutine reads and decodes the stream while this one applies:
	// each apply takes whatever arrived during the one before (up to
	// maxApply), so batches grow with the load. Waiting for the reader's
	// buffer to run dry instead made batches of one or two events over
	// TLS, which hands over one record per read.
	evs := make(chan job.Event, 2*maxApply)
	readErr := make(chan error, 1)
	go func() {
		defer close(evs)
		readErr <- f.read(ctx, resp.Body, evs)
	}()
	defer func() {
		resp.Body.Close() // stops the reader if apply failed
		for range evs {
		}
	}()
	batch := make([]job.Event, 0, maxApply)
	for {
		ev, ok := <-evs
		if !ok {
			return <-readErr
		}
		batch = append(batch[:0], ev)
	more:
		for len(batch) < maxApply {
			select {
			case ev, ok := <-evs:
				if !ok {
					break more
				}
				batch = append(batch, ev)
			default:
				break more
			}
		}
		if err := f.apply(ctx, batch); err != nil {
			return err
		}
	}
}

// read decodes the event stream into evs until it breaks.
func (f *follower) read(ctx context.Context, body io.Reader, evs chan<- job.Event) error {
	br := bufio.NewReaderSize(body, 64<<10)
	var data strings.Builder
	var id string
	var buf []byte
	for {
		// Lines are bounded: a stream that sends an endless line is
		// dropped, not held in memory.
		buf = buf[:0]
		for {
			frag, err := br.ReadSlice('\n')
			buf = append(buf, frag...)
			if err == nil {
				break
			}
			if err != bufio.ErrBufferFull {
				return fmt.Errorf("read event stream: %w", err)
			}
			if len(buf) > maxEventBytes {
				return fmt.Errorf("read event stream: a line longer than %d bytes", maxEventBytes)
			}
		}
		if data.Len()+len(buf) > maxEventBytes {
			return fmt.Errorf("read event stream: an event longer than %d bytes", maxEventBytes)
		}
		line := strings.TrimRight(string(buf), "\r\n")
		switch {
		case strings.HasPrefix(line, "id: "):
			id = line[len("id: "):]
		case strings.HasPrefix(line, "data: "):
			data.WriteString(line[len("data: "):])
		case line == "" && data.Len() > 0:
			var ev job.Event
			if err := json.Unmarshal([]byte(data.String()), &ev); err == nil && id != "" {
				ev.Seq = id
				select {
				case evs <- ev:
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			data.Reset()
			id = ""
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

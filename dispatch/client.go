package dispatch

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/writ-fleet/writ/httpsig"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/queue"
)

// Client is a node's side: it takes the node's work from the site's
// dispatcher (the supervisor) and reports back, signing every request with
// the node key. It is a runner.Queue.
type Client struct {
	BaseURL string    // the supervisor's URL
	Key     *keys.Key // the node key
	NodeID  string    // the key's node ID (ledger.NodeID)
	HTTP    *http.Client
	Log     *slog.Logger

	mu        sync.Mutex
	running   map[string]context.CancelFunc // guarded by mu; the runs under way, by job ID
	cancelled map[string]bool               // guarded by mu; jobs the dispatcher cancelled (at most maxCancelled)
}

func (c *Client) url(path string) string { return strings.TrimRight(c.BaseURL, "/") + path }

func (c *Client) do(ctx context.Context, method, path string, body []byte) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.url(path), bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if err := httpsig.Sign(req, body, c.NodeID, c.Key.Private, time.Now()); err != nil {
		return nil, err
	}
	return c.HTTP.Do(req)
}

// Ping reports whether the dispatcher takes this node.
func (c *Client) Ping(ctx context.Context) error {
	resp, err := c.do(ctx, http.MethodGet, "/v1/node/ping", nil)
	if err != nil {
		return fmt.Errorf("dispatcher %s: %w", c.BaseURL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("dispatcher %s: HTTP %d: %s", c.BaseURL, resp.StatusCode, bytes.TrimSpace(b))
	}
	return nil
}

// Publish sends events of one job (the runner's reporter sends one job's
// at a time).
func (c *Client) Publish(ctx context.Context, _ string, events ...job.Event) error {
	if len(events) == 0 {
		return nil
	}
	return c.send(ctx, Report{ID: events[0].Job, Events: events})
}

func (c *Client) send(ctx context.Context, rep Report) error {
	body, err := json.Marshal(rep)
	if err != nil {
		return err
	}
	resp, err := c.do(ctx, http.MethodPost, "/v1/node/report", body)
	if err != nil {
		return fmt.Errorf("report to %s: %w", c.BaseURL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("report to %s: HTTP %d: %s", c.BaseURL, resp.StatusCode, bytes.TrimSpace(b))
	}
	return nil
}

// Work takes deliveries from the node's stream and runs each with h, at
// most cfg.Concurrency at once, until ctx ends; a broken stream is opened
// again with backoff. It then waits for running jobs (cfg.ShutdownTimeout).
func (c *Client) Work(ctx context.Context, cfg queue.WorkerConfig, h queue.Handler) error {
	if cfg.Concurrency < 1 || cfg.Concurrency > MaxSlots {
		return fmt.Errorf("dispatch: concurrency %d out of range", cfg.Concurrency)
	}
	shutdown := cfg.ShutdownTimeout
	if shutdown == 0 {
		shutdown = queue.DefaultShutdownTimeout
	}
	// Jobs outlive the stream's context by the shutdown timeout.
	jobCtx, cancelJobs := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelJobs()
	var wg sync.WaitGroup
	sem := make(chan struct{}, cfg.Concurrency)
	run := func(d Delivery) {
		if d.Cancel {
			c.cancel(d.ID)
			return
		}
		sem <- struct{}{}
		wg.Add(1)
		runCtx, stop := context.WithCancel(jobCtx)
		c.started(d.ID, stop)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			defer c.ended(d.ID)
			err := h(runCtx, queue.Delivery{ID: d.ID, Envelope: d.Envelope, Queue: "dispatch", Attempt: d.Attempt, MaxRetry: d.MaxRetry})
			done := Done{Outcome: OutcomeOK}
			switch {
			case err == nil:
			case queue.IsNoRetry(err):
				done = Done{Outcome: OutcomeFail, Error: err.Error()}
			default:
				done = Done{Outcome: OutcomeRetry, Error: err.Error()}
			}
			for try := 0; try < 10; try++ {
				rctx, cancel := context.WithTimeout(jobCtx, 10*time.Second)
				err := c.send(rctx, Report{ID: d.ID, Done: &done})
				cancel()
				if err == nil || jobCtx.Err() != nil {
					return
				}
				c.Log.Warn("report a job's end", "job", d.ID, "err", err)
				time.Sleep(time.Duration(200<<min(try, 5)) * time.Millisecond)
			}
		}()
	}
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		start := time.Now()
		err := c.stream(ctx, cfg.Concurrency, run)
		if ctx.Err() != nil {
			break
		}
		if time.Since(start) > time.Minute {
			backoff = 100 * time.Millisecond
		}
		c.Log.Warn("work stream ended; reconnecting", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 10*time.Second)
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(shutdown):
		cancelJobs()
		<-finished
	}
	return nil
}

// stream reads one work stream until it ends.
func (c *Client) stream(ctx context.Context, slots int, run func(Delivery)) error {
	resp, err := c.do(ctx, http.MethodGet, "/v1/node/work?slots="+strconv.Itoa(slots), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("HTTP %d: %s", resp.StatusCode, bytes.TrimSpace(b))
	}
	// A heartbeat every Heartbeat: a silent stream is a dead one.
	body := &deadlineReader{r: resp.Body, d: 3 * Heartbeat, cancel: resp.Body.Close}
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 64<<10), MaxReportBytes)
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 || string(line) == "{}" {
			continue
		}
		var d Delivery
		if err := json.Unmarshal(line, &d); err != nil || d.ID == "" {
			return fmt.Errorf("bad delivery: %v", err)
		}
		run(d)
	}
	if err := sc.Err(); err != nil {
		return err
	}
	return errors.New("stream closed")
}

// deadlineReader closes its body when nothing came for d.
type deadlineReader struct {
	r      io.Reader
	d      time.Duration
	cancel func() error
	t      *time.Timer
}

func (dr *deadlineReader) Read(p []byte) (int, error) {
	if dr.t == nil {
		dr.t = time.AfterFunc(dr.d, func() { dr.cancel() })
	} else {
		dr.t.Reset(dr.d)
	}
	n, err := dr.r.Read(p)
	if err != nil {
		dr.t.Stop()
	}
	return n, err
}

// maxCancelled bounds the cancelled job IDs a client remembers.
const maxCancelled = 4096

// started records a run's cancel func, so the dispatcher can stop it.
func (c *Client) started(id string, stop context.CancelFunc) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.running == nil {
		c.running = map[string]context.CancelFunc{}
	}
	c.running[id] = stop
}

// ended forgets a run's cancel func (and ends its context).
func (c *Client) ended(id string) {
	c.mu.Lock()
	stop := c.running[id]
	delete(c.running, id)
	c.mu.Unlock()
	if stop != nil {
		stop()
	}
}

// cancel stops job id's run, which the dispatcher said was cancelled.
func (c *Client) cancel(id string) {
	c.mu.Lock()
	if c.cancelled == nil || len(c.cancelled) >= maxCancelled {
		c.cancelled = map[string]bool{}
	}
	c.cancelled[id] = true
	stop := c.running[id]
	c.mu.Unlock()
	if stop != nil {
		c.Log.Info("the dispatcher cancelled a running job: stopping it", "job", id)
		stop()
	}
}

// CancelRequested reports whether the dispatcher said job id was
// cancelled (the runner then reports its stopped run as cancelled, not as
// a shutdown to retry).
func (c *Client) CancelRequested(_ context.Context, _, id string) (bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cancelled[id], nil
}

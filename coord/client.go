package coord

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/writ-fleet/writ/flow"
	"github.com/writ-fleet/writ/httpsig"
	"github.com/writ-fleet/writ/internal/httpapi"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/queue"
)

// Client talks to coord's HTTP API.
type Client struct {
	// BaseURL is coord's address, e.g. http://127.0.0.1:7702.
	BaseURL string
	// HTTP is the client to use; nil means http.DefaultClient.
	HTTP *http.Client
	// Key signs every request (RFC 9421): coord answers only users it
	// knows, and shows each the jobs it may read.
	Key *keys.Key
}

// RejectedError is a job coord or its supervisor refused.
type RejectedError struct {
	Status int
	Reply  SubmitReply
}

func (e *RejectedError) Error() string {
	if e.Reply.Reason != "" {
		return fmt.Sprintf("job rejected (%s): %s", e.Reply.Reason, e.Reply.Error)
	}
	return fmt.Sprintf("job rejected (HTTP %d): %s", e.Status, e.Reply.Error)
}

func (c *Client) http() *http.Client {
	if c.HTTP != nil {
		return c.HTTP
	}
	return http.DefaultClient
}

func (c *Client) url(path string) string { return strings.TrimRight(c.BaseURL, "/") + path }

// do signs req (whose body is body) with the client's key and sends it.
func (c *Client) do(req *http.Request, body []byte) (*http.Response, error) {
	if c.Key != nil {
		if err := httpsig.Sign(req, body, c.Key.ID, c.Key.Private, time.Now()); err != nil {
			return nil, err
		}
	}
	return c.http().Do(req)
}

// Submit posts a signed envelope. A refusal is a *RejectedError carrying
// the job ID (when the envelope had one) and the reason.
func (c *Client) Submit(ctx context.Context, envelopeJSON []byte) (SubmitReply, error) {
	rep, _, err := c.submit(ctx, envelopeJSON, 0)
	return rep, err
}

// SubmitWait posts a signed envelope and waits up to wait for the job to
// end, in one request. It returns the job's record (which may still be
// running when wait passed), or a *RejectedError.
func (c *Client) SubmitWait(ctx context.Context, envelopeJSON []byte, wait time.Duration) (*job.Record, error) {
	_, j, err := c.submit(ctx, envelopeJSON, wait)
	return j, err
}

func (c *Client) submit(ctx context.Context, envelopeJSON []byte, wait time.Duration) (SubmitReply, *job.Record, error) {
	u := c.url("/v1/jobs")
	if wait > 0 {
		u += "?wait=" + wait.String()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(envelopeJSON))
	if err != nil {
		return SubmitReply{}, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.do(req, envelopeJSON)
	if err != nil {
		return SubmitReply{}, nil, fmt.Errorf("coord %s: %w", c.BaseURL, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if wait > 0 && resp.StatusCode == http.StatusOK {
		var j job.Record
		if err := json.Unmarshal(data, &j); err != nil {
			return SubmitReply{}, nil, fmt.Errorf("coord: bad reply: %w", err)
		}
		return SubmitReply{ID: j.ID, State: string(j.State)}, &j, nil
	}
	rep, err := submitReply(resp.StatusCode, data)
	return rep, nil, err
}

func submitReply(status int, data []byte) (SubmitReply, error) {
	var rep SubmitReply
	if err := json.Unmarshal(data, &rep); err != nil || rep.State == "" {
		var eb httpapi.ErrorBody
		json.Unmarshal(data, &eb)
		if eb.Error == "" {
			eb.Error = strings.TrimSpace(string(data))
		}
		return SubmitReply{}, &RejectedError{Status: status, Reply: SubmitReply{State: "rejected", Reason: job.Reason(eb.Reason), Error: eb.Error}}
	}
	if status != http.StatusAccepted {
		return rep, &RejectedError{Status: status, Reply: rep}
	}
	return rep, nil
}

// Job returns a job's record; wait > 0 blocks until it ends or wait passes.
func (c *Client) Job(ctx context.Context, id string, wait time.Duration) (*job.Record, error) {
	u := c.url("/v1/jobs/" + url.PathEscape(id))
	if wait > 0 {
		u += "?wait=" + wait.String()
	}
	var j job.Record
	return &j, c.get(ctx, u, &j)
}

// Jobs lists jobs (see ListFilter).
func (c *Client) Jobs(ctx context.Context, f queue.ListFilter) (ListReply, error) {
	v := url.Values{}
	if f.Site != "" {
		v.Set("site", f.Site)
	}
	if f.State != "" {
		v.Set("state", string(f.State))
	}
	if f.Limit > 0 {
		v.Set("limit", strconv.Itoa(f.Limit))
	}
	if f.Before > 0 {
		v.Set("before", strconv.FormatInt(f.Before, 10))
	}
	var rep ListReply
	return rep, c.get(ctx, c.url("/v1/jobs?"+v.Encode()), &rep)
}

func (c *Client) get(ctx context.Context, u string, out any) error {
	return c.call(ctx, http.MethodGet, u, out)
}

// call sends a bodiless request and decodes a 200 answer into out.
func (c *Client) call(ctx context.Context, method, u string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return err
	}
	resp, err := c.do(req, nil)
	if err != nil {
		return fmt.Errorf("coord %s: %w", c.BaseURL, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode != http.StatusOK {
		var eb httpapi.ErrorBody
		json.Unmarshal(data, &eb)
		if eb.Error == "" {
			eb.Error = strings.TrimSpace(string(data))
		}
		return fmt.Errorf("coord: %s (HTTP %d)", eb.Error, resp.StatusCode)
	}
	return json.Unmarshal(data, out)
}

// Watch calls fn for each of the job's events (history first) until the
// job ends, fn returns false, or ctx ends. A broken stream is resumed.
func (c *Client) Watch(ctx context.Context, id string, fn func(job.Event) bool) error {
	lastID := ""
	return follow(ctx, "watch job "+id, func(*bool) (bool, error) { return c.watchOnce(ctx, id, &lastID, fn) })
}

// follow reads a stream with once until it is over (once says so: the
// stream ended as it should, or coord refused it, err says why), reading
// it again with a growing pause when it breaks, at most 5 times in a row
// without progress (once sets *progressed when an event came).
func follow(ctx context.Context, what string, once func(progressed *bool) (over bool, err error)) error {
	for attempt := 0; ; attempt++ {
		progressed := false
		over, err := once(&progressed)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if over {
			return err
		}
		if progressed {
			attempt = 0
		}
		if attempt >= 5 {
			return fmt.Errorf("%s: %w", what, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Duration(attempt+1) * 500 * time.Millisecond):
		}
	}
}

func (c *Client) watchOnce(ctx context.Context, id string, lastID *string, fn func(job.Event) bool) (bool, error) {
	return c.stream(ctx, "/v1/jobs/"+url.PathEscape(id)+"/events", func(_, data string) bool {
		var ev job.Event
		if json.Unmarshal([]byte(data), &ev) != nil {
			return false
		}
		if ev.Seq != "" && *lastID != "" && !seqAfter(ev.Seq, *lastID) {
			return false // already seen before a reconnect
		}
		if ev.Seq != "" {
			*lastID = ev.Seq
		}
		return !fn(ev) || ev.Type.Terminal()
	})
}

// stream reads the server-sent events at path, calling fn with each
// event's type and data until fn says the stream is over. It reports
// whether it is over (fn said so, or coord refused the stream: err says
// why) or broke (err), to be read again.
func (c *Client) stream(ctx context.Context, path string, fn func(typ, data string) (over bool)) (bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url(path), nil)
	if err != nil {
		return false, err
	}
	resp, err := c.do(req, nil)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		var eb httpapi.ErrorBody
		json.Unmarshal(data, &eb)
		return true, fmt.Errorf("coord: %s (HTTP %d)", eb.Error, resp.StatusCode)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var (
		data strings.Builder
		typ  string
	)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "event: "):
			typ = line[len("event: "):]
		case strings.HasPrefix(line, "data: "):
			data.WriteString(line[len("data: "):])
		case line == "" && data.Len() > 0:
			over := fn(typ, data.String())
			data.Reset()
			typ = ""
			if over {
				return true, nil
			}
		}
	}
	if err := sc.Err(); err != nil {
		return false, err
	}
	return false, io.ErrUnexpectedEOF
}

// FlowStreamEvent is one event of a flow's stream: Flow for a "flow"
// event, Step for a "step" one.
type FlowStreamEvent struct {
	Flow *FlowEvent
	Step *flow.StepSummary
}

// WatchFlow calls fn with the flow's events (the flow as it is first)
// until the flow ends, fn returns false, or ctx ends. A broken stream is
// read again; it starts again from the flow as it is, so fn may see a
// step's summary more than once.
func (c *Client) WatchFlow(ctx context.Context, id string, fn func(FlowStreamEvent) bool) error {
	return follow(ctx, "watch flow "+id, func(progressed *bool) (bool, error) {
		return c.stream(ctx, "/v1/flows/"+url.PathEscape(id)+"/events", func(typ, data string) bool {
			var ev FlowStreamEvent
			switch typ {
			case "flow":
				ev.Flow = &FlowEvent{}
				if json.Unmarshal([]byte(data), ev.Flow) != nil {
					return false
				}
			case "step":
				ev.Step = &flow.StepSummary{}
				if json.Unmarshal([]byte(data), ev.Step) != nil {
					return false
				}
			default:
				return false // a type this client does not know
			}
			*progressed = true
			return !fn(ev) || (ev.Flow != nil && flow.Ended(ev.Flow.State))
		})
	})
}

// SubmitFlow posts a signed flow envelope. A flow coord refuses (below a
// site's threshold, malformed, expired) is a *FlowRejectedError.
func (c *Client) SubmitFlow(ctx context.Context, envelopeJSON []byte) (*FlowReply, error) {
	return c.postFlow(ctx, "/v1/flows", envelopeJSON)
}

// Flow returns a flow's state, every step's progress and the outputs.
func (c *Client) Flow(ctx context.Context, id string) (*FlowReply, error) {
	var rep FlowReply
	return &rep, c.get(ctx, c.url("/v1/flows/"+url.PathEscape(id)), &rep)
}

// Flows lists the caller's flows, newest first.
func (c *Client) Flows(ctx context.Context) ([]FlowReply, error) {
	var out []FlowReply
	return out, c.get(ctx, c.url("/v1/flows"), &out)
}

// CancelFlow cancels a flow: nothing more of it starts.
func (c *Client) CancelFlow(ctx context.Context, id string) (*FlowReply, error) {
	return c.postFlow(ctx, "/v1/flows/"+url.PathEscape(id)+"/cancel", nil)
}

// FlowRejectedError is a flow coord refused, or a call it failed.
type FlowRejectedError struct {
	Status int
	Reply  FlowReply
}

func (e *FlowRejectedError) Error() string {
	if e.Reply.Reason != "" {
		return fmt.Sprintf("flow %s: %s: %s", e.Reply.State, e.Reply.Reason, e.Reply.Error)
	}
	return fmt.Sprintf("coord: %s (HTTP %d)", e.Reply.Error, e.Status)
}

func (c *Client) postFlow(ctx context.Context, path string, body []byte) (*FlowReply, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url(path), bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.do(req, body)
	if err != nil {
		return nil, fmt.Errorf("coord %s: %w", c.BaseURL, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	var rep FlowReply
	if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusAccepted {
		if err := json.Unmarshal(data, &rep); err != nil {
			return nil, fmt.Errorf("coord: bad reply: %w", err)
		}
		return &rep, nil
	}
	if json.Unmarshal(data, &rep) != nil || rep.State == "" {
		var eb httpapi.ErrorBody
		json.Unmarshal(data, &eb)
		rep = FlowReply{Reason: job.Reason(eb.Reason), Error: eb.Error}
		if rep.Error == "" {
			rep.Error = strings.TrimSpace(string(data))
		}
	}
	return nil, &FlowRejectedError{Status: resp.StatusCode, Reply: rep}
}

// CancelJob cancels a job: a queued one is removed, a running one stopped.
func (c *Client) CancelJob(ctx context.Context, id string) (*CancelReply, error) {
	var rep CancelReply
	return &rep, c.call(ctx, http.MethodPost, c.url("/v1/jobs/"+url.PathEscape(id)+"/cancel"), &rep)
}

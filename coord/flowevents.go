package coord

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/writ-fleet/writ/flow"
	"github.com/writ-fleet/writ/job"
)

// A flow's event stream (GET /v1/flows/{id}/events) sends what changes in
// it as server-sent events: "flow" when the flow's state does, "step" (a
// flow.StepSummary) when a step's does. The first events are the flow as
// it is; the stream ends after the flow's last "flow" event. Every event
// carries the flow's version as its id. A client that reconnects gets the
// flow as it is again (coord keeps no history of a flow's versions), so it
// compares summaries rather than counting on each change once.

// FlowEvent is the data of a "flow" event.
type FlowEvent struct {
	ID      string `json:"id"`
	Name    string `json:"name"`
	State   string `json:"state"`
	Error   string `json:"error,omitempty"`
	Version int64  `json:"version"`
}

// flowStreamCheck is how often a flow's stream reads the flow without a
// wake (a wake lost with a coord, a slow subscriber), and sends a
// heartbeat.
const flowStreamCheck = 2 * time.Second

// flowKey is the hub key of flow id's changes (job IDs are hex: no job
// has it).
func flowKey(id string) string { return "flow/" + id }

// notifyFlows wakes the streams of the flows ids, here and at the other
// coords (the flow engine's notify).
func (c *Coord) notifyFlows(ctx context.Context, ids []string) {
	for _, id := range ids {
		c.hub.publish(job.Event{Job: flowKey(id)})
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := c.p.Redis.PublishFlows(ctx, c.p.ID, ids); err != nil {
		c.p.Log.Debug("tell the other coords of a flow's change (their streams re-read within 2 s)", "err", err)
	}
}

func (c *Coord) flowEvents(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	release, err := c.auth.stream(principalOf(ctx))
	if err != nil {
		failFlow(w, err)
		return
	}
	defer release()
	rec, err := c.readableFlow(r)
	if err != nil {
		failFlow(w, err)
		return
	}
	id := rec.ID
	wake, unsubscribe := c.hub.subscribe(flowKey(id))
	defer unsubscribe()
	flusher, ok := w.(http.Flusher)
	if !ok {
		failFlow(w, errors.New("streaming unsupported"))
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)

	sendRaw := func(typ string, v int64, b []byte) bool {
		_, err := fmt.Fprintf(w, "id: %d\nevent: %s\ndata: %s\n\n", v, typ, b)
		return err == nil
	}
	var (
		version   int64 = -1
		lastState string
		sent      = map[string]string{} // step → the summary sent, as JSON
	)
	send := func(typ string, v int64, data any) bool {
		b, _ := json.Marshal(data)
		return sendRaw(typ, v, b)
	}
	// update sends what changed since the last version sent; it reports
	// whether the stream is over (the flow ended, the client left).
	update := func() bool {
		if version >= 0 {
			// The version first: a stream of a large flow that did not
			// change reads a number, not the flow.
			if v, err := c.p.Redis.FlowVersion(ctx, id); err != nil || v <= version {
				return errors.Is(err, context.Canceled)
			}
			var err error
			if rec, err = c.p.Redis.GetFlowProgress(ctx, id); err != nil {
				return errors.Is(err, context.Canceled) // else: try again at the next check
			}
		}
		if rec.Version <= version {
			return false
		}
		version = rec.Version
		fl, err := c.flows.flowOf(ctx, id)
		var run flow.Run
		if err == nil {
			err = json.Unmarshal(rec.Run, &run)
		}
		if err != nil {
			send("flow", version, FlowEvent{ID: id, Name: rec.Name, State: "unknown", Error: "coord cannot read this flow: " + err.Error(), Version: version})
			return true
		}
		for _, s := range run.Summary(fl) {
			b, _ := json.Marshal(s)
			if sent[s.Step] == string(b) {
				continue
			}
			sent[s.Step] = string(b)
			if !sendRaw("step", version, b) {
				return true
			}
		}
		if run.State != lastState {
			lastState = run.State
			if !send("flow", version, FlowEvent{ID: id, Name: rec.Name, State: run.State, Error: run.Error, Version: version}) {
				return true
			}
		}
		flusher.Flush()
		return run.Done()
	}
	if update() {
		return
	}
	tick := time.NewTicker(flowStreamCheck)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-wake:
		case <-tick.C:
			if _, err := fmt.Fprint(w, ": ping\n\n"); err != nil {
				return
			}
		}
		if update() {
			return
		}
	}
}

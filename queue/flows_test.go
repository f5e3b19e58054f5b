package queue

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/writ-fleet/writ/internal/testenv"
)

// TestFlows_Store: a flow is recorded once; updates compare versions, so
// of two concurrent updates from one version exactly one lands; the step
// jobs an update starts point back at the flow.
func TestFlows_Store(t *testing.T) {
	r, err := Connect(testenv.Redis(t))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx := context.Background()
	rec := FlowRecord{ID: "f1", Name: "example", Envelope: []byte(`{"payloadType":"x"}`), Users: []string{"alice"}, Submitted: time.Now(), Run: []byte(`{"state":"running"}`)}
	if created, err := r.CreateFlow(ctx, rec, time.Hour); err != nil || !created {
		t.Fatalf("CreateFlow = %v, %v", created, err)
	}
	rec.Run = []byte(`{"state":"overwritten"}`)
	if created, err := r.CreateFlow(ctx, rec, time.Hour); err != nil || created {
		t.Fatalf("CreateFlow again = %v, %v; want no change", created, err)
	}
	got, err := r.GetFlow(ctx, "f1")
	if err != nil || string(got.Run) != `{"state":"running"}` || got.Version != 0 || got.Users[0] != "alice" || got.Name != "example" {
		t.Fatalf("GetFlow = %+v, %v", got, err)
	}
	if _, err := r.GetFlow(ctx, "nope"); !errors.Is(err, ErrNoFlow) {
		t.Errorf("GetFlow of none = %v", err)
	}
	// The progress alone: all but the envelope.
	prog, err := r.GetFlowProgress(ctx, "f1")
	if err != nil || prog.Envelope != nil || string(prog.Run) != string(got.Run) || prog.Version != 0 || prog.Users[0] != "alice" || prog.Name != "example" || !prog.Submitted.Equal(got.Submitted) {
		t.Fatalf("GetFlowProgress = %+v, %v", prog, err)
	}
	if _, err := r.GetFlowProgress(ctx, "nope"); !errors.Is(err, ErrNoFlow) {
		t.Errorf("GetFlowProgress of none = %v", err)
	}
	if v, err := r.FlowVersion(ctx, "f1"); err != nil || v != 0 {
		t.Errorf("FlowVersion = %d, %v", v, err)
	}
	if _, err := r.FlowVersion(ctx, "nope"); !errors.Is(err, ErrNoFlow) {
		t.Errorf("FlowVersion of none = %v", err)
	}

	// Two updates from version 0: one lands, one conflicts.
	var wins, conflicts atomic.Int32
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Go(func() {
			_, err := r.UpdateFlow(ctx, "f1", 0, []byte(`{"state":"running","n":`+string(rune('0'+i))+`}`), false,
				map[string]StepRef{"job-" + string(rune('a'+i)): {Flow: "f1", Step: "s", Item: i, Attempt: 1}}, time.Hour)
			switch {
			case err == nil:
				wins.Add(1)
			case errors.Is(err, ErrFlowConflict):
				conflicts.Add(1)
			default:
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if wins.Load() != 1 || conflicts.Load() != 1 {
		t.Fatalf("%d updates landed, %d conflicted", wins.Load(), conflicts.Load())
	}
	got, _ = r.GetFlow(ctx, "f1")
	refs, ok, err := r.FlowSteps(ctx, "job-a", "job-b", "unrelated")
	if err != nil || ok[2] || ok[0] == ok[1] || got.Version != 1 {
		t.Fatalf("FlowSteps = %+v %v %v; version %d", refs, ok, err, got.Version)
	}
	if ids, err := r.ActiveFlows(ctx, 10); err != nil || len(ids) != 1 {
		t.Errorf("active flows = %v, %v", ids, err)
	}
	if v, err := r.UpdateFlow(ctx, "f1", 1, []byte(`{}`), true, nil, time.Hour); err != nil || v != 2 {
		t.Errorf("update from the current version = %d, %v", v, err)
	}
	if ids, err := r.ActiveFlows(ctx, 10); err != nil || len(ids) != 0 {
		t.Errorf("active flows after its end = %v, %v", ids, err)
	}
	if _, err := r.UpdateFlow(ctx, "gone", 0, []byte(`{}`), false, nil, time.Hour); !errors.Is(err, ErrNoFlow) {
		t.Errorf("update of no flow = %v", err)
	}
	if ids, err := r.ListFlows(ctx, "alice", 10); err != nil || len(ids) != 1 || ids[0] != "f1" {
		t.Errorf("ListFlows = %v, %v", ids, err)
	}
}

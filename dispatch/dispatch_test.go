package dispatch_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/writ-fleet/writ/dispatch"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/httpsig"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
	"github.com/writ-fleet/writ/verify"
)

// site is a dispatcher over a real Redis, with a registry of node keys.
type site struct {
	t       *testing.T
	rdb     *queue.Redis
	srv     *dispatch.Server
	hs      *httptest.Server
	mu      sync.Mutex
	nodes   map[string]ed25519.PublicKey
	revoked map[string]bool
}

func newSite(t *testing.T) *site { return newSiteOn(t, testenv.Redis(t)) }

// newSiteOn is a dispatcher of site s on the Redis at url.
func newSiteOn(t *testing.T, url string) *site {
	rdb, err := queue.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	s := &site{t: t, rdb: rdb, nodes: map[string]ed25519.PublicKey{}, revoked: map[string]bool{}}
	s.srv = &dispatch.Server{Site: "s", Redis: rdb, Log: slog.New(slog.DiscardHandler), Concurrency: 16,
		Revoked: func(_ context.Context, id string) bool {
			s.mu.Lock()
			defer s.mu.Unlock()
			return s.revoked[id]
		},
		NodeKey: func(_ context.Context, id string) (ed25519.PublicKey, error) {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.revoked[id] {
				return nil, errors.New("revoked")
			}
			if pub, ok := s.nodes[id]; ok {
				return pub, nil
			}
			return nil, errors.New("unknown node")
		}}
	r := chi.NewRouter()
	s.srv.Mount(r)
	s.hs = httptest.NewServer(r)
	t.Cleanup(s.hs.Close)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.srv.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return s
}

// node registers a key and returns a client for it.
func (s *site) node(name string, register bool) *dispatch.Client {
	k, _ := keys.Generate(name)
	id := ledger.NodeID(k.Public)
	if register {
		s.mu.Lock()
		s.nodes[id] = k.Public
		s.mu.Unlock()
	}
	return &dispatch.Client{BaseURL: s.hs.URL, Key: k, NodeID: id, HTTP: &http.Client{}, Log: slog.New(slog.DiscardHandler)}
}

func (s *site) enqueue(id, node string) {
	s.t.Helper()
	j := envelope.NewJob(id, "x := 1", "s", time.Now())
	j.Node = node
	admin, _ := keys.Generate("a")
	env, _ := j.Sign(admin)
	raw, _ := json.Marshal(env)
	if _, err := s.rdb.Enqueue(context.Background(), queue.Task{ID: id, Envelope: raw, Queue: queue.SiteQueue("s"), MaxRetry: 3, Timeout: time.Minute}); err != nil {
		s.t.Fatal(err)
	}
}

// TestDispatch_NodesTakeTheirOwnWork: a job pinned to a node reaches only
// that node; site jobs reach any; a stranger's key gets no stream; a node
// cannot report for another's job; a revoked node's stream is cut.
func TestDispatch_NodesTakeTheirOwnWork(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: skipped under -short (make test runs it)")
	}
	s := newSite(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	ran := map[string]string{} // job → node
	work := func(c *dispatch.Client) {
		go c.Work(ctx, queue.WorkerConfig{Concurrency: 2}, func(ctx context.Context, d queue.Delivery) error {
			mu.Lock()
			ran[d.ID] = c.NodeID
			mu.Unlock()
			return c.Publish(ctx, "s", job.Event{Job: d.ID, Type: job.EventSucceeded, Node: c.NodeID, At: time.Now()})
		})
	}
	a, b := s.node("a", true), s.node("b", true)
	work(a)
	work(b)
	stranger := s.node("stranger", false)
	var strangerRan atomic.Int32
	go stranger.Work(ctx, queue.WorkerConfig{Concurrency: 2}, func(context.Context, queue.Delivery) error { strangerRan.Add(1); return nil })
	testenv.WaitFor(t, 10*time.Second, "two nodes connected", func() bool { return s.srv.Connected() == 2 })

	for i := range 10 {
		s.enqueue("pin-a-"+string(rune('0'+i)), a.NodeID)
		s.enqueue("pin-b-"+string(rune('0'+i)), b.NodeID)
		s.enqueue("site-"+string(rune('0'+i)), "")
	}
	// Steps of a flow pinned to a node: the pin is read from the signed
	// flow the task carries.
	admin, _ := keys.Generate("a")
	fl := envelope.NewFlow("f", "s", time.Now())
	fl.Steps = []envelope.Step{{Name: "on_b", Script: "x := 1", Node: b.NodeID, ForEach: json.RawMessage(`[1,2,3,4,5]`)}}
	fenv, err := fl.Sign(admin)
	if err != nil {
		t.Fatal(err)
	}
	fraw, _ := json.Marshal(fenv)
	for i := range 5 {
		st, _ := json.Marshal(verify.StepTask{Flow: fraw, Step: "on_b", Item: i, Attempt: 1, Value: json.RawMessage(strconv.Itoa(i + 1))})
		if _, err := s.rdb.Enqueue(context.Background(), queue.Task{ID: fmt.Sprintf("pin-b-step-%d", i), Envelope: st, Queue: queue.SiteQueue("s"), MaxRetry: 3, Timeout: time.Minute}); err != nil {
			t.Fatal(err)
		}
	}
	testenv.WaitFor(t, 20*time.Second, "35 jobs to run", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(ran) == 35
	})
	mu.Lock()
	for id, node := range ran {
		switch {
		case id[:5] == "pin-a" && node != a.NodeID, id[:5] == "pin-b" && node != b.NodeID:
			t.Errorf("job %s ran on %s", id, node)
		}
	}
	mu.Unlock()
	if strangerRan.Load() != 0 {
		t.Errorf("a stranger's key took %d jobs", strangerRan.Load())
	}
	if err := stranger.Ping(ctx); err == nil {
		t.Error("a stranger's ping answered")
	}

	// b cannot speak for a job sent to a: hold a job on a, report as b.
	held := make(chan string, 1)
	release := make(chan struct{})
	c := s.node("c", true)
	go c.Work(ctx, queue.WorkerConfig{Concurrency: 1}, func(ctx context.Context, d queue.Delivery) error {
		held <- d.ID
		<-release
		return nil
	})
	testenv.WaitFor(t, 10*time.Second, "c connected", func() bool { return s.srv.Connected() == 3 })
	s.enqueue("pin-c", c.NodeID)
	id := <-held
	if err := b.Publish(ctx, "s", job.Event{Job: id, Type: job.EventSucceeded, At: time.Now()}); err == nil {
		t.Error("node b reported for a job running on node c")
	}
	body, _ := json.Marshal(dispatch.Report{ID: id, Done: &dispatch.Done{Outcome: dispatch.OutcomeOK}})
	req, _ := http.NewRequest(http.MethodPost, s.hs.URL+"/v1/node/report", bytes.NewReader(body))
	httpsig.Sign(req, body, b.NodeID, b.Key.Private, time.Now())
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusNotFound {
		t.Errorf("b ending c's job = %v %v, want 404", resp.StatusCode, err)
	} else {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	// c itself may not flood the site's stream for its job.
	flood := make([]job.Event, 5000)
	for i := range flood {
		flood[i] = job.Event{Job: id, Type: job.EventLog, Message: "x", At: time.Now()}
	}
	var floodErr error
	for range 5 {
		if floodErr = c.Publish(ctx, "s", flood...); floodErr != nil {
			break
		}
	}
	if floodErr == nil || !strings.Contains(floodErr.Error(), "429") {
		t.Errorf("25,000 events for one job = %v, want 429 past %d", floodErr, dispatch.MaxJobEvents)
	}
	close(release)

	// Revoke a: its stream is cut within the key cache's life, and its
	// pinned jobs wait (they reach no one else).
	s.mu.Lock()
	s.revoked[a.NodeID] = true
	s.mu.Unlock()
	testenv.WaitFor(t, 20*time.Second, "the revoked node's stream to be cut", func() bool { return s.srv.Connected() == 2 })
	s.enqueue("pin-a-after", a.NodeID)
	s.enqueue("site-after", "")
	testenv.WaitFor(t, 10*time.Second, "the site job to run elsewhere", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return ran["site-after"] != "" && ran["site-after"] != a.NodeID
	})
	time.Sleep(time.Second)
	mu.Lock()
	if node, ok := ran["pin-a-after"]; ok {
		t.Errorf("a job pinned to the revoked node ran on %s", node)
	}
	mu.Unlock()
}

// TestDispatch_Placement: a job that states resources goes to the node
// coord placed it on (recorded by the supervisor), while that node is
// connected.
func TestDispatch_Placement(t *testing.T) {
	s := newSite(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	ran := map[string]string{}
	var clients []*dispatch.Client
	for _, name := range []string{"a", "b", "c"} {
		c := s.node(name, true)
		clients = append(clients, c)
		go c.Work(ctx, queue.WorkerConfig{Concurrency: 4}, func(ctx context.Context, d queue.Delivery) error {
			mu.Lock()
			ran[d.ID] = c.NodeID
			mu.Unlock()
			return nil
		})
	}
	testenv.WaitFor(t, 10*time.Second, "three nodes", func() bool { return s.srv.Connected() == 3 })
	admin, _ := keys.Generate("a")
	target := clients[2].NodeID
	for i := range 6 {
		id := "placed-" + string(rune('0'+i))
		j := envelope.NewJob(id, "x := 1", "s", time.Now())
		j.Resources = envelope.Resources{CPU: 1}
		env, _ := j.Sign(admin)
		raw, _ := json.Marshal(env)
		if err := s.rdb.SetPlacement(ctx, "s", id, target, time.Minute); err != nil {
			t.Fatal(err)
		}
		if _, err := s.rdb.Enqueue(ctx, queue.Task{ID: id, Envelope: raw, Queue: queue.SiteQueue("s"), MaxRetry: 1, Timeout: time.Minute}); err != nil {
			t.Fatal(err)
		}
	}
	testenv.WaitFor(t, 20*time.Second, "six placed jobs", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(ran) == 6
	})
	for id, node := range ran {
		if node != target {
			t.Errorf("placed job %s ran on %s, not the placed %s", id, node, target)
		}
	}
}

// TestDispatch_NoNodesJobsWait: with no node connected the site queue is
// paused: a job with no retries, enqueued then, is not taken (and so not
// failed at its deadline); it runs once a node connects.
func TestDispatch_NoNodesJobsWait(t *testing.T) {
	s := newSite(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	testenv.WaitFor(t, 10*time.Second, "Run to pause the site queue (no node connected)", func() bool {
		p, err := s.rdb.Paused(queue.SiteQueue("s"))
		return err == nil && p
	})
	j := envelope.NewJob("waits", "x := 1", "s", time.Now())
	admin, _ := keys.Generate("a")
	env, _ := j.Sign(admin)
	raw, _ := json.Marshal(env)
	if _, err := s.rdb.Enqueue(ctx, queue.Task{ID: "waits", Envelope: raw, Queue: queue.SiteQueue("s"), MaxRetry: 0, Timeout: time.Second}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2500 * time.Millisecond) // past the task's 1 s deadline
	if d, err := s.rdb.QueueDepth(queue.SiteQueue("s")); err != nil || d[queue.SiteQueue("s")] != 1 {
		t.Fatalf("with no node, the job left the queue: depth %v, %v", d, err)
	}
	ran := make(chan string, 1)
	c := s.node("late", true)
	go c.Work(ctx, queue.WorkerConfig{Concurrency: 1}, func(ctx context.Context, d queue.Delivery) error {
		ran <- d.ID
		return nil
	})
	select {
	case id := <-ran:
		if id != "waits" {
			t.Errorf("ran %s", id)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the waiting job did not run once a node connected")
	}
}

// TestDispatch_TwoDispatchersAgreeOnPause: two dispatchers of one site
// share its queue. The queue is paused only while neither has a node: one
// with no node does not pause it under the other's nodes, however often it
// says so, and a dispatcher that dies stops counting.
func TestDispatch_TwoDispatchersAgreeOnPause(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: skipped under -short (make test runs it)")
	}
	url := testenv.Redis(t)
	a, b := newSiteOn(t, url), newSiteOn(t, url)
	q := queue.SiteQueue("s")
	paused := func() bool {
		p, err := a.rdb.Paused(q)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	testenv.WaitFor(t, 5*time.Second, "the queue paused with no node anywhere", paused)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan string, 4)
	c := b.node("on-b", true)
	go c.Work(ctx, queue.WorkerConfig{Concurrency: 1}, func(ctx context.Context, d queue.Delivery) error {
		ran <- d.ID
		return nil
	})
	testenv.WaitFor(t, 5*time.Second, "the queue resumed for b's node", func() bool { return !paused() })
	// a has a node for a while, then loses it: the queue stays on for
	// b's, then and while a renews its count of none (every 5 s).
	actx, acancel := context.WithCancel(ctx)
	ca := a.node("on-a", true)
	adone := make(chan struct{})
	go func() {
		ca.Work(actx, queue.WorkerConfig{Concurrency: 1}, func(ctx context.Context, d queue.Delivery) error { return nil })
		close(adone)
	}()
	time.Sleep(time.Second)
	acancel()
	<-adone
	deadline := time.Now().Add(6 * time.Second)
	for time.Now().Before(deadline) {
		if paused() {
			t.Fatal("a dispatcher with no node paused the queue under the other's node")
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Straight from Redis, as a dispatcher would say it: a's count of 0
	// does not pause, b's 0 does.
	if p, err := a.rdb.SetDispatching("s", "a-again", 0, time.Minute); err != nil || p {
		t.Fatalf("a count of 0 beside b's node = paused %v, %v", p, err)
	}
	// A dead dispatcher's nodes count until its entry lapses.
	if p, err := a.rdb.SetDispatching("s", "dead", 3, 300*time.Millisecond); err != nil || p {
		t.Fatalf("a dispatcher with 3 nodes = paused %v, %v", p, err)
	}
	cancel() // b's node goes
	testenv.WaitFor(t, 30*time.Second, "the queue paused again once no dispatcher has a node", paused)
}

// TestDispatch_CancelStopsTheNode: cancelling a job a node runs (the
// supervisor's queue.CancelJob) ends the run on the node within seconds,
// the node knows it was cancelled, and its report of the stopped run is
// taken.
func TestDispatch_CancelStopsTheNode(t *testing.T) {
	s := newSite(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	n := s.node("n", true)
	started := make(chan string, 1)
	stopped := make(chan time.Time, 1)
	worked := make(chan struct{})
	go func() {
		defer close(worked)
		n.Work(ctx, queue.WorkerConfig{Concurrency: 1}, func(jctx context.Context, d queue.Delivery) error {
			started <- d.ID
			<-jctx.Done()
			stopped <- time.Now()
			if yes, _ := n.CancelRequested(jctx, "s", d.ID); !yes {
				return errors.New("stopped, but not told it was cancelled")
			}
			n.Publish(context.Background(), "s", job.Event{Job: d.ID, Type: job.EventFailed, Reason: job.ReasonCancelled, At: time.Now()})
			return queue.NoRetry(errors.New("cancelled"))
		})
	}()
	defer func() { cancel(); <-worked }()
	testenv.WaitFor(t, 10*time.Second, "the node connected", func() bool { return s.srv.Connected() == 1 })
	s.enqueue("long", "")
	id := <-started
	at := time.Now()
	if res, err := s.rdb.CancelJob(ctx, "s", id, queue.SiteQueue("s")); err != nil || res != queue.CancelRunning {
		t.Fatalf("cancel = %v, %v; want running", res, err)
	}
	select {
	case end := <-stopped:
		if d := end.Sub(at); d > 2*time.Second {
			t.Errorf("the node stopped the run %s after the cancel", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the node's run was not stopped")
	}
	// The node's report of its stopped run reached the site's stream.
	testenv.WaitFor(t, 10*time.Second, "the cancelled end on the site's stream", func() bool {
		evs, _ := s.rdb.ReadEvents(ctx, "s", "0", 100, 0)
		for _, ev := range evs {
			if ev.Job == id && ev.Type == job.EventFailed && ev.Reason == job.ReasonCancelled {
				return true
			}
		}
		return false
	})
	if yes, _ := n.CancelRequested(ctx, "s", "another"); yes {
		t.Error("a job never cancelled counts as cancelled")
	}
}

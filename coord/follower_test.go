package coord

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/queue"
)

// TestFollower_TLSStream: over TLS (one record per read) every event is
// applied once, in order, and the cursor ends at the last; a stream that
// sends an endless line is dropped instead of held in memory.
func TestFollower_TLSStream(t *testing.T) {
	const n = 600
	endless := make(chan struct{})
	sup := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		fl := w.(http.Flusher)
		select {
		case <-endless:
			chunk := strings.Repeat("x", 64<<10)
			fmt.Fprint(w, "data: ")
			for i := 0; i < 200 && r.Context().Err() == nil; i++ {
				if _, err := io.WriteString(w, chunk); err != nil {
					return
				}
			}
			return
		default:
		}
		if r.URL.Query().Get("after") != "0" {
			<-r.Context().Done()
			return
		}
		for i := 1; i <= n; i++ {
			fmt.Fprintf(w, "id: %d-0\ndata: {\"job\":\"j%d\",\"type\":\"log\",\"at\":\"2026-12-02T00:00:00Z\",\"message\":\"m\"}\n\n", i, i%7)
			if i%3 == 0 {
				fl.Flush() // small writes: small TLS records
			}
		}
		fl.Flush()
		<-r.Context().Done()
	}))
	defer sup.Close()
	rdb, err := queue.Connect(testenv.Redis(t))
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	var mu sync.Mutex
	var got []string
	batches := 0
	done := make(chan struct{})
	f := &follower{p: followerParams{
		site:  "tls-follow",
		redis: rdb,
		url:   func(string) (string, error) { return sup.URL, nil },
		http:  sup.Client(),
		log:   slog.New(slog.NewTextHandler(io.Discard, nil)),
		applied: func(evs []job.Event) {
			mu.Lock()
			defer mu.Unlock()
			batches++
			for _, ev := range evs {
				got = append(got, ev.Seq)
			}
			if len(got) == n {
				close(done)
			}
		},
	}}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- f.follow(ctx) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("applied %d of %d events", len(got), n)
	}
	cancel()
	<-errc
	for i, seq := range got {
		if want := fmt.Sprintf("%d-0", i+1); seq != want {
			t.Fatalf("event %d is %s, want %s", i, seq, want)
		}
	}
	if c, _ := rdb.Cursor(context.Background(), "tls-follow"); c != fmt.Sprintf("%d-0", n) {
		t.Errorf("cursor %s, want %d-0", c, n)
	}
	t.Logf("%d events in %d batches", n, batches)

	close(endless)
	err = f.follow(context.Background())
	if err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Fatalf("endless line: %v, want a refusal", err)
	}
}

package e2e

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/queue"
)

// TestFleet_CoordTakeover: two coords share one Redis and both serve the
// API; one at a time follows the site (a lease). A job submitted to the
// one that does not follow is answered when it ends (the follower tells
// the other coord). kill -9 of the lease holder: the other coord takes
// the site over within 10 s, and every job, before, during and after,
// succeeds with each of its events applied once.
func TestFleet_CoordTakeover(t *testing.T) {
	slow(t)
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	f.startSupervisor("local")
	a := f.startCoord()
	portB := testenv.FreePort(t)
	b := f.start("coord-b", "coord", "--listen", testenv.Addr(portB), "--redis", f.redis, "--ledger", f.ledger)
	urlB := "https://" + testenv.Addr(portB)
	f.waitReady(urlB)
	f.startRunner("n1", 4)
	rdb, err := queue.Connect(f.redis)
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()

	holder := func() string {
		h, _ := rdb.LeaseHolder(ctx, "follow:local")
		return h
	}
	testenv.WaitFor(t, 30*time.Second, "a coord to follow site local", func() bool { return holder() != "" })
	pidOf := func(id string) int {
		parts := strings.Split(id, ":")
		if len(parts) < 3 {
			return 0
		}
		pid, _ := strconv.Atoi(parts[len(parts)-2])
		return pid
	}
	owner, other, otherURL := a, b, urlB
	if pidOf(holder()) == b.cmd.Process.Pid {
		owner, other, otherURL = b, a, f.coord
	} else if pidOf(holder()) != a.cmd.Process.Pid {
		t.Fatalf("lease held by %q, neither coord (pids %d, %d)", holder(), a.cmd.Process.Pid, b.cmd.Process.Pid)
	}
	viaOther := f.clientAs(f.admin)
	viaOther.BaseURL = otherURL

	quick := func(name string) []byte {
		return rawEnvelope(t, envelope.NewJob(name, `job := import("job"); job.result("ok")`, "local", time.Now()), f.admin)
	}
	start := time.Now()
	rec, err := viaOther.SubmitWait(ctx, quick("via-the-other-coord"), 30*time.Second)
	if err != nil || rec.State != job.StateSucceeded {
		t.Fatalf("job through the coord that does not follow the site = %+v, %v", rec, err)
	}
	t.Logf("a job through the coord that does not follow answered in %s", time.Since(start).Round(time.Millisecond))

	var ids []string
	submit := func(name, script string) {
		t.Helper()
		rep, err := viaOther.Submit(ctx, rawEnvelope(t, envelope.NewJob(name, script, "local", time.Now()), f.admin))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, rep.ID)
	}
	slow := `job := import("job"); times := import("times"); times.sleep(2 * times.second); job.result("slow")`
	for i := 0; i < 8; i++ {
		submit(fmt.Sprintf("during-%d", i), slow)
	}
	old := holder()
	owner.cmd.Process.Kill()
	killed := time.Now()
	testenv.WaitFor(t, 30*time.Second, "the other coord to take the site over", func() bool {
		h := holder()
		return h != "" && h != old
	})
	took := time.Since(killed)
	t.Logf("taken over in %s", took.Round(time.Millisecond))
	if took > 10*time.Second {
		t.Errorf("takeover took %s, want within 10 s", took)
	}
	if pidOf(holder()) != other.cmd.Process.Pid {
		t.Errorf("lease now held by %q, not the surviving coord", holder())
	}
	for i := 0; i < 8; i++ {
		submit(fmt.Sprintf("after-%d", i), `job := import("job"); job.result("after")`)
	}
	for _, id := range ids {
		got, err := viaOther.Job(ctx, id, 60*time.Second)
		if err != nil || got.State != job.StateSucceeded {
			t.Errorf("job %s = %+v, %v", id, got, err)
			continue
		}
		evs, err := rdb.JobEvents(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		counts := map[job.EventType]int{}
		for _, ev := range evs {
			if seen[ev.Seq] {
				t.Errorf("job %s: event %s applied twice", id, ev.Seq)
			}
			seen[ev.Seq] = true
			counts[ev.Type]++
		}
		if counts[job.EventQueued] != 1 || counts[job.EventStarted] != 1 || counts[job.EventSucceeded] != 1 {
			t.Errorf("job %s: events %v, want one queued, started and succeeded", id, counts)
		}
	}
}

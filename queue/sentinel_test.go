package queue

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/writ-fleet/writ/internal/redisproc"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
)

// sentinelSet is a primary, a replica and three sentinels on loopback,
// with writ's ACL users (a supervisor's and a runner's) and the internal
// users replication and Sentinel log in as.
type sentinelSet struct {
	primary, replica *redisproc.Process
	sentinels        []*redisproc.Process
	url              string // redis+sentinel://…, without the user
	password         string
}

func startSentinelSet(t *testing.T, site string) *sentinelSet {
	t.Helper()
	const password = "sentinel-test-password"
	users := []redisproc.User{
		{Name: ACLSupervisor, Password: password, Rules: ACLRules(ACLSupervisor, site)},
		{Name: ACLRunner, Password: password, Rules: ACLRules(ACLRunner, site)},
	}
	start := func(name string, cfg redisproc.Config) *redisproc.Process {
		cfg.Dir = filepath.Join(t.TempDir(), name)
		cfg.Port = testenv.FreePort(t)
		cfg.Users, cfg.Internal = users, "internal-test-password"
		cfg.Log = filepath.Join(cfg.Dir, "redis.log")
		if err := mkdir(cfg.Dir); err != nil {
			t.Fatal(err)
		}
		p, err := redisproc.Start(cfg)
		if err != nil {
			t.Fatalf("start %s: %v", name, err)
		}
		t.Cleanup(p.Stop)
		return p
	}
	s := &sentinelSet{password: password}
	s.primary = start("primary", redisproc.Config{})
	// Two replicas: with wait_replicas=1 (the default) the site keeps
	// accepting work after one is promoted.
	s.replica = start("replica", redisproc.Config{ReplicaOf: s.primary.Addr()})
	start("replica2", redisproc.Config{ReplicaOf: s.primary.Addr()})
	var addrs []string
	for i := 0; i < 3; i++ {
		p := start(fmt.Sprintf("sentinel-%d", i), redisproc.Config{Sentinel: &redisproc.Sentinel{
			Master: "writ", Primary: s.primary.Addr(), Quorum: 2, DownAfter: time.Second,
		}})
		s.sentinels = append(s.sentinels, p)
		addrs = append(addrs, p.Addr())
	}
	s.url = "redis+sentinel://%s@" + addrs[0] + "/0?master_name=writ&addr=" + addrs[1] + "&addr=" + addrs[2]
	// The sentinels learn the replica (and each other) from the primary.
	sc := redis.NewSentinelClient(&redis.Options{Addr: addrs[0], Username: ACLRunner, Password: password})
	defer sc.Close()
	testenv.WaitFor(t, 30*time.Second, "sentinels to see the replica", func() bool {
		reps, err := sc.Replicas(context.Background(), "writ").Result()
		return err == nil && len(reps) == 2
	})
	return s
}

func (s *sentinelSet) dial(t *testing.T, user string) *Redis {
	t.Helper()
	r, err := Dial(fmt.Sprintf(s.url, user), Credentials{Password: s.password})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := r.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestSentinel_FailoverUnderLoad: jobs are admitted (enqueued and marked
// queued with WAIT for the replica, retried by the client until accepted,
// as coord does) and run by a worker while the primary is killed -9.
// Sentinel promotes the replica; every accepted job succeeds exactly once.
func TestSentinel_FailoverUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: skipped under -short (make test runs it)")
	}
	const site, n = "ha", 300
	set := startSentinelSet(t, site)
	sup := set.dial(t, ACLSupervisor)
	run := set.dial(t, ACLRunner)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	q := SiteQueue(site)

	var mu sync.Mutex
	runs := map[string]int{}
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		run.Work(ctx, WorkerConfig{Site: site, Queues: map[string]int{q: 1}, Concurrency: 4, Log: quiet},
			func(ctx context.Context, d Delivery) error {
				mu.Lock()
				runs[d.ID]++
				mu.Unlock()
				time.Sleep(5 * time.Millisecond)
				return run.Publish(ctx, site, job.Event{Job: d.ID, Type: job.EventSucceeded, Attempt: d.Attempt, At: time.Now()})
			})
	}()
	// The worker stops before its client closes (cleanups run last in,
	// first out): asynq v0.26.0's subscriber reads a nil message, and
	// panics, from a cancel channel its client has closed under it.
	t.Cleanup(func() { cancel(); <-wdone })

	var accepted atomic.Int32
	var retries atomic.Int32
	admit := func(id string) {
		claim := Claim{Site: site, Nonce: "n-" + id, JobID: id, Until: time.Now().Add(time.Hour)}
		for {
			err := func() error {
				ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				defer cancel()
				adm, err := sup.Admit(ctx, []Claim{claim})
				if err != nil {
					return err
				}
				switch adm[0] {
				case AdmitNew:
					if _, err := sup.Enqueue(ctx, Task{ID: id, Envelope: []byte("{}"), Queue: q, MaxRetry: 5, Timeout: time.Minute}); err != nil {
						return err
					}
				case AdmitInFlight:
					if _, _, err := sup.EnqueueUnlessEnded(ctx, site, Task{ID: id, Envelope: []byte("{}"), Queue: q, MaxRetry: 5, Timeout: time.Minute}); err != nil {
						return err
					}
				}
				return sup.Queued(ctx, site, []Claim{claim}, nil)
			}()
			if err == nil {
				accepted.Add(1)
				return
			}
			retries.Add(1)
			time.Sleep(100 * time.Millisecond)
		}
	}
	for i := 0; i < n; i++ {
		if i == n/3 {
			set.primary.Kill()
			t.Logf("primary killed after %d jobs", i)
		}
		admit(fmt.Sprintf("job-%03d", i))
	}
	t.Logf("%d accepted, %d admissions retried", accepted.Load(), retries.Load())

	done := func() (int, map[string]int) {
		evs, err := sup.ReadEvents(ctx, site, "0", 100000, -1)
		if err != nil {
			return 0, nil
		}
		succ := map[string]int{}
		for _, ev := range evs {
			if ev.Type == job.EventSucceeded {
				succ[ev.Job]++
			}
		}
		return len(succ), succ
	}
	testenv.WaitFor(t, 120*time.Second, "every accepted job to succeed", func() bool {
		k, _ := done()
		return k == n
	})
	_, succ := done()
	for id, c := range succ {
		if c != 1 {
			t.Errorf("job %s succeeded %d times", id, c)
		}
	}
	// A task whose acknowledgement was lost in the failover stays active
	// until asynq recovers it (its 30 s lease, a recoverer that runs each
	// minute with 30 s of skew; one whose lease entry was lost, after the
	// workers' 30 s rescue first): up to about two and a half minutes.
	insp := asynq.NewInspectorFromRedisClient(sup.rdb)
	settled := time.Now()
	testenv.WaitFor(t, 200*time.Second, "no task left active", func() bool {
		info, err := insp.GetQueueInfo(q)
		return err == nil && info.Active == 0 && info.Pending == 0
	})
	t.Logf("every task acknowledged %s after the last job succeeded", time.Since(settled).Round(time.Second))
	if _, succ := done(); len(succ) != n {
		t.Errorf("%d jobs succeeded after recovery, want %d", len(succ), n)
	} else {
		for id, c := range succ {
			if c != 1 {
				t.Errorf("after recovery, job %s succeeded %d times", id, c)
			}
		}
	}
	addr, _ := redis.NewSentinelClient(&redis.Options{Addr: set.sentinels[1].Addr(), Username: ACLRunner, Password: set.password}).
		GetMasterAddrByName(ctx, "writ").Result()
	if len(addr) != 2 || strings.HasSuffix(set.primary.Addr(), ":"+addr[1]) {
		t.Errorf("the primary is now %v, want a replica (the old one was %s)", addr, set.primary.Addr())
	}
}

func mkdir(dir string) error { return os.MkdirAll(dir, 0o700) }

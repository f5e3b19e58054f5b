// Command writ-ledger-bench registers many simulated nodes with a real
// ledger (SQLite store, HTTP API over loopback, every request signed by
// the node's own key) and then sends their uptime reports open-loop at one
// per node per interval, reporting throughput and latency percentiles.
//
//	go run ./cmd/writ-ledger-bench -nodes 100000 -for 60s   (make bench-ledger)
package main

import (
	"context"
	"crypto/ed25519"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/ledger/store/postgres"
	"github.com/writ-fleet/writ/ledger/store/sqlite"
)

var (
	nodes     = flag.Int("nodes", 100000, "simulated nodes")
	interval  = flag.Duration("interval", time.Minute, "each node reports once per interval")
	runFor    = flag.Duration("for", time.Minute, "how long to send uptime reports")
	workers   = flag.Int("workers", 256, "requests in flight at most")
	keep      = flag.Bool("keep", false, "keep the temporary directory (the SQLite file)")
	storeKind = flag.String("store", "sqlite", "the ledger's store: sqlite (a file) or postgres (a throwaway local cluster, durable)")
	cpuprof   = flag.String("cpuprofile", "", "write a CPU profile of the uptime phase (server and load generator share the process)")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "writ-ledger-bench:", err)
		os.Exit(1)
	}
}

type sample struct {
	lat time.Duration
	err bool
}

// firstErr keeps the first failed request's error of a phase.
var firstErr atomic.Pointer[error]

func run() error {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "writ-ledger-bench")
	if err != nil {
		return err
	}
	if !*keep {
		defer os.RemoveAll(dir)
	}
	var store interface {
		ledger.Store
		Close() error
	}
	switch *storeKind {
	case "sqlite":
		store, err = sqlite.Open(ctx, filepath.Join(dir, "ledger.db"))
	case "postgres":
		// A throwaway cluster of this machine's PostgreSQL, durable
		// (fsync and synchronous commit on, as a real ledger runs it),
		// on its unix socket; it dies with the benchmark.
		testenv.PostgresDurable = true
		var url string
		if url, err = testenv.PostgresDB("writ_ledger_bench"); err == nil {
			store, err = postgres.Open(ctx, url)
		}
	default:
		return fmt.Errorf("-store %q: sqlite or postgres", *storeKind)
	}
	if err != nil {
		return err
	}
	defer store.Close()
	admin, _ := keys.Generate("bench-admin")
	if err := ledger.Init(ctx, store, "root", admin.AuthorizedKey(), &ledger.Site{Name: "bench", SupervisorURL: "http://127.0.0.1:1",
		Policy: ledger.Policy{Roles: ledger.DefaultPolicyRoles, Threshold: 1}, UptimeInterval: ledger.Seconds(*interval / time.Second)}); err != nil {
		return err
	}
	srv := ledger.NewServer(store, slog.New(slog.DiscardHandler), prometheus.NewRegistry(), nil)
	// Every simulated node comes from this one address: the per-source
	// limits, meant for strangers, would throttle the whole fleet.
	srv.Harden(ledger.ServerOptions{RateLimits: &ledger.NoRateLimits})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: srv.Handler()}
	go hs.Serve(ln)
	defer hs.Close()
	url := "http://" + ln.Addr().String()
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: *workers, MaxConnsPerHost: *workers}}
	// A token enrolls at most ledger.MaxTokenUses nodes: one per that many.
	var tokens []string
	for n := 0; n < *nodes; n += ledger.MaxTokenUses {
		tok, err := (&ledger.Client{BaseURL: url, Key: admin, HTTP: hc}).CreateTokenFor(ctx, "bench", ledger.CreateTokenRequest{Uses: ledger.MaxTokenUses})
		if err != nil {
			return err
		}
		tokens = append(tokens, tok.Secret)
	}

	fmt.Printf("machine: %d CPUs, %s; ledger: %s store (temporary directory %s)\n", runtime.NumCPU(), runtime.Version(), *storeKind, dir)
	clients := make([]*ledger.Client, *nodes)
	ids := make([]string, *nodes)
	start := time.Now()
	for i := range clients {
		pub, priv, _ := ed25519.GenerateKey(nil)
		k := &keys.Key{ID: ledger.NodeID(pub), Public: pub, Private: priv, Comment: fmt.Sprintf("node-%d", i)}
		clients[i] = ledger.NodeClient(url, k, hc)
		ids[i] = k.ID
	}
	fmt.Printf("keys: %d in %s\n", *nodes, time.Since(start).Round(time.Millisecond))

	// Registration: closed loop, as fast as the ledger takes it.
	var next atomic.Int64
	regLat := make([]sample, *nodes)
	start = time.Now()
	var wg sync.WaitGroup
	for w := 0; w < *workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= *nodes {
					return
				}
				t0 := time.Now()
				_, err := clients[i].Register(ctx, ledger.RegisterRequest{Site: "bench", Token: tokens[i/ledger.MaxTokenUses], PublicKey: clients[i].Key.AuthorizedKey(),
					Capacity: ledger.Capacity{CPUs: 8, MemoryMiB: 32768}})
				regLat[i] = sample{time.Since(t0), err != nil}
				if err != nil {
					firstErr.CompareAndSwap(nil, &err)
				}
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	report("register", regLat, took)
	if e := firstErr.Swap(nil); e != nil {
		fmt.Printf("register: first error: %v\n", *e)
	}

	// Uptime: open loop. Report k is due at start + k/rate, for node k mod
	// N; its latency counts from when it was due, so a ledger that falls
	// behind shows it.
	if *cpuprof != "" {
		f, err := os.Create(*cpuprof)
		if err != nil {
			return err
		}
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	rate := float64(*nodes) / interval.Seconds()
	total := int(rate * runFor.Seconds())
	lat := make([]sample, total)
	sem := make(chan struct{}, *workers)
	start = time.Now()
	var lateStarts atomic.Int64
	for k := 0; k < total; k++ {
		due := start.Add(time.Duration(float64(k) / rate * float64(time.Second)))
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
		select {
		case sem <- struct{}{}:
		default:
			lateStarts.Add(1)
			sem <- struct{}{}
		}
		wg.Add(1)
		go func(k int, due time.Time) {
			defer func() { <-sem; wg.Done() }()
			i := k % *nodes
			_, err := clients[i].ReportUptime(ctx, ids[i], ledger.Uptime{BootID: "boot-1", UptimeSeconds: int64(k), At: time.Now().UTC()})
			lat[k] = sample{time.Since(due), err != nil}
			if err != nil {
				firstErr.CompareAndSwap(nil, &err)
			}
		}(k, due)
	}
	wg.Wait()
	took = time.Since(start)
	fmt.Printf("uptime: target %.0f reports/s (%d nodes, one per %s) for %s\n", rate, *nodes, *interval, *runFor)
	report("uptime", lat, took)
	if e := firstErr.Swap(nil); e != nil {
		fmt.Printf("uptime: first error: %v\n", *e)
	}
	if n := lateStarts.Load(); n > 0 {
		fmt.Printf("  %d reports waited for a free worker (all %d busy)\n", n, *workers)
	}
	return nil
}

func report(what string, s []sample, took time.Duration) {
	var lats []time.Duration
	errs := 0
	for _, x := range s {
		if x.err {
			errs++
		}
		lats = append(lats, x.lat)
	}
	sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
	pct := func(p float64) time.Duration { return lats[min(len(lats)-1, int(p*float64(len(lats))))] }
	fmt.Printf("%s: %d in %s = %.0f/s; errors %d; p50 %s p90 %s p99 %s max %s\n", what, len(s), took.Round(time.Millisecond),
		float64(len(s))/took.Seconds(), errs, pct(0.5).Round(10*time.Microsecond), pct(0.9).Round(10*time.Microsecond), pct(0.99).Round(10*time.Microsecond), lats[len(lats)-1].Round(time.Millisecond))
}

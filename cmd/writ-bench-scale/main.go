// Command writ-bench-scale simulates many nodes on one dispatched site
// (make bench-scale): a real redis-server, a real ledger and a real
// supervisor with --dispatch (writ processes, HTTPS with a CA of their
// own), and N simulated nodes in this process, each registered with its
// own key and holding its own signed work stream, as writ node
// --supervisor does. It measures the idle site (Redis commands/s and
// connections per node, this process's CPU per node) and the busy one
// (pickup latency on an idle site, throughput).
//
//	go run ./cmd/writ-bench-scale -nodes 1000
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"github.com/writ-fleet/writ/internal/fleet"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/writ-fleet/writ/dispatch"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/redisproc"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/queue"
)

var (
	nodes   = flag.Int("nodes", 1000, "simulated nodes")
	idleFor = flag.Duration("idle", 10*time.Second, "idle measuring window")
	pickups = flag.Int("pickups", 200, "jobs sent one at a time to the idle site, for pickup latency")
	jobs    = flag.Int("jobs", 3000, "jobs in the throughput run")
	slots   = flag.Int("slots", 4, "jobs each simulated node runs at once")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "writ-bench-scale:", err)
		os.Exit(1)
	}
}

func freePort() int {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func run() error {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "writ-bench-scale")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "writ")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/writ").CombinedOutput(); err != nil {
		return fmt.Errorf("build writ: %v\n%s", err, out)
	}
	// The CA and the services' certificates; the bench submits as coord.
	ca, err := fleet.OpenCA(filepath.Join(dir, "ca"), "bench-ca")
	if err != nil {
		return err
	}
	for _, n := range []string{"ledger", "supervisor", "coord"} {
		if _, _, err := ca.Issue(n, "127.0.0.1"); err != nil {
			return err
		}
	}
	caFile := ca.File()
	tc, err := ca.Config("coord")
	if err != nil {
		return err
	}
	hc := tc.HTTPClient(0)
	hc.Transport.(*http.Transport).MaxIdleConnsPerHost = *nodes + 64

	rdir := filepath.Join(dir, "redis")
	os.MkdirAll(rdir, 0o700)
	rp, err := redisproc.Start(redisproc.Config{Dir: rdir, Port: freePort()})
	if err != nil {
		return err
	}
	defer rp.Stop()

	admin, _ := keys.Generate("bench-admin")
	adminKey := filepath.Join(dir, "admin.key")
	if err := admin.Save(adminKey); err != nil {
		return err
	}
	ledgerPort, supPort := freePort(), freePort()
	ledgerURL, supURL := fmt.Sprintf("https://127.0.0.1:%d", ledgerPort), fmt.Sprintf("https://127.0.0.1:%d", supPort)
	db := filepath.Join(dir, "ledger.db")
	if out, err := exec.Command(bin, "ledger", "init", "--db", db, "--admin-key", adminKey+".pub", "--site", "bench", "--supervisor", supURL).CombinedOutput(); err != nil {
		return fmt.Errorf("ledger init: %v\n%s", err, out)
	}
	start := func(name string, args ...string) (*exec.Cmd, error) {
		cmd := exec.Command(bin, append(args, "--ca", caFile, "--tls-cert", filepath.Join(ca.Dir(), name+".crt"), "--tls-key", filepath.Join(ca.Dir(), name+".key"), "--log-level", "warn")...)
		logf, _ := os.Create(filepath.Join(dir, name+".log"))
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		return cmd, cmd.Start()
	}
	// Every simulated node enrolls from this one address.
	lcmd, err := start("ledger", "ledger", "serve", "--db", db, "--listen", fmt.Sprintf("127.0.0.1:%d", ledgerPort), "--register-rate", "0")
	if err != nil {
		return err
	}
	defer func() { lcmd.Process.Signal(syscall.SIGTERM); lcmd.Wait() }()
	scmd, err := start("supervisor", "supervisor", "--site", "bench", "--dispatch", "--listen", fmt.Sprintf("127.0.0.1:%d", supPort),
		"--redis", rp.URL(), "--ledger", ledgerURL)
	if err != nil {
		return err
	}
	defer func() { scmd.Process.Signal(syscall.SIGTERM); scmd.Wait() }()
	lc := &ledger.Client{BaseURL: ledgerURL, Key: admin, HTTP: hc}
	if err := waitFor(30*time.Second, func() bool { _, err := lc.Sites(ctx); return err == nil }); err != nil {
		return fmt.Errorf("the ledger did not come up: %w", err)
	}

	// Register the nodes (one token per MaxTokenUses), then open their
	// streams.
	fmt.Printf("machine: %d CPUs, %s; %d simulated nodes, %d slots each\n", runtime.NumCPU(), runtime.Version(), *nodes, *slots)
	var tokens []string
	for n := 0; n < *nodes; n += ledger.MaxTokenUses {
		tok, err := lc.CreateTokenFor(ctx, "bench", ledger.CreateTokenRequest{Uses: ledger.MaxTokenUses})
		if err != nil {
			return err
		}
		tokens = append(tokens, tok.Secret)
	}
	ran := &tracker{at: map[string]time.Time{}}
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	log := slog.New(slog.DiscardHandler)
	t0 := time.Now()
	for i := range *nodes {
		k, _ := keys.Generate(fmt.Sprintf("sim-%d", i))
		id := ledger.NodeID(k.Public)
		nc := ledger.NodeClient(ledgerURL, k, hc)
		if _, err := nc.Register(ctx, ledger.RegisterRequest{Site: "bench", Token: tokens[i/ledger.MaxTokenUses], PublicKey: k.AuthorizedKey(), Capacity: ledger.Capacity{CPUs: 4, MemoryMiB: 4096}}); err != nil {
			return fmt.Errorf("register node %d: %w", i, err)
		}
		c := &dispatch.Client{BaseURL: supURL, Key: k, NodeID: id, HTTP: hc, Log: log}
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.Work(sctx, queue.WorkerConfig{Concurrency: *slots}, func(ctx context.Context, d queue.Delivery) error {
				ran.mark(d.ID)
				return c.Publish(ctx, "bench", job.Event{Job: d.ID, Type: job.EventSucceeded, Node: id, Attempt: d.Attempt, At: time.Now()})
			})
		}()
	}
	fmt.Printf("registered and connected %d nodes in %s\n", *nodes, time.Since(t0).Round(time.Millisecond))
	rdb, err := queue.Connect(rp.URL())
	if err != nil {
		return err
	}
	defer rdb.Close()
	// Let every stream open and the first checks pass.
	time.Sleep(5 * time.Second)

	// Idle.
	cmds0, _ := rdb.InfoInt(ctx, "stats", "total_commands_processed")
	cpu0, sup0 := selfCPU(), procCPU(scmd.Process.Pid)
	w0 := time.Now()
	time.Sleep(*idleFor)
	win := time.Since(w0)
	cmds1, _ := rdb.InfoInt(ctx, "stats", "total_commands_processed")
	cpu1, sup1 := selfCPU(), procCPU(scmd.Process.Pid)
	clients, _ := rdb.InfoInt(ctx, "clients", "connected_clients")
	cmdsPerNode := float64(cmds1-cmds0) / win.Seconds() / float64(*nodes)
	connsPerNode := float64(clients-1) / float64(*nodes) // less this bench's own INFO connection
	corePerNode := 100 * (cpu1 - cpu0).Seconds() / win.Seconds() / float64(*nodes)
	fmt.Printf("idle: Redis %.0f commands/s in all (%.3f per node), %d clients (%.3f per node); nodes %.4f%% of a core each; supervisor %.1f%% of a core\n",
		float64(cmds1-cmds0)/win.Seconds(), cmdsPerNode, clients-1, connsPerNode, corePerNode, 100*(sup1-sup0).Seconds()/win.Seconds())

	// Busy: pickup latency on the idle site, one job at a time.
	submit := func(raws [][]byte) error {
		var body bytes.Buffer
		body.WriteByte('[')
		for i, r := range raws {
			if i > 0 {
				body.WriteByte(',')
			}
			body.Write(r)
		}
		body.WriteByte(']')
		resp, err := hc.Post(supURL+"/v1/jobs/batch", "application/json", &body)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		data, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("HTTP %d: %s", resp.StatusCode, data)
		}
		var vs []job.Verdict
		json.Unmarshal(data, &vs)
		for _, v := range vs {
			if v.State != job.VerdictQueued {
				return fmt.Errorf("job %s: %s %s", v.ID, v.Reason, v.Error)
			}
		}
		return nil
	}
	sign := func(i int) ([]byte, string) {
		j := envelope.NewJob("scale", `x := 1`, "bench", time.Now())
		j.Args = json.RawMessage(`{"i":` + strconv.Itoa(i) + `}`)
		env, _ := j.Sign(admin)
		raw, _ := json.Marshal(env)
		return raw, env.ID()
	}
	var lat []time.Duration
	for i := range *pickups {
		raw, id := sign(i)
		t := time.Now()
		if err := submit([][]byte{raw}); err != nil {
			return fmt.Errorf("pickup job: %w", err)
		}
		got := ran.wait(id, 30*time.Second)
		if got.IsZero() {
			return fmt.Errorf("job %s was never picked up", id)
		}
		lat = append(lat, got.Sub(t))
		time.Sleep(20 * time.Millisecond)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	p := func(q float64) time.Duration { return lat[int(q*float64(len(lat)-1))] }
	fmt.Printf("pickup on an idle site (submit to the supervisor → a node has the job), %d jobs: p50 %s p99 %s\n", len(lat), p(0.5).Round(10*time.Microsecond), p(0.99).Round(10*time.Microsecond))

	// Throughput: batches of 64, 8 in flight.
	raws := make([][]byte, *jobs)
	ids := make([]string, *jobs)
	for i := range raws {
		raws[i], ids[i] = sign(100000 + i)
	}
	t1 := time.Now()
	var swg sync.WaitGroup
	errc := make(chan error, 1)
	sem := make(chan struct{}, 8)
	for i := 0; i < len(raws); i += 64 {
		sem <- struct{}{}
		swg.Add(1)
		go func(b [][]byte) {
			defer swg.Done()
			defer func() { <-sem }()
			if err := submit(b); err != nil {
				select {
				case errc <- err:
				default:
				}
			}
		}(raws[i:min(i+64, len(raws))])
	}
	swg.Wait()
	select {
	case err := <-errc:
		return err
	default:
	}
	for _, id := range ids {
		if ran.wait(id, 60*time.Second).IsZero() {
			return fmt.Errorf("job %s never ran", id)
		}
	}
	tput := float64(len(ids)) / time.Since(t1).Seconds()
	fmt.Printf("throughput: %d jobs through %d nodes in %s: %.0f jobs/s\n", len(ids), *nodes, time.Since(t1).Round(time.Millisecond), tput)
	stop()
	wg.Wait()
	fmt.Printf("scale: %d nodes, idle %.2f cmds/s/node, %.3f conns/node, %.4f%% core/node, pickup p99 %.1f ms\n",
		*nodes, cmdsPerNode, connsPerNode, corePerNode, float64(p(0.99).Microseconds())/1000)
	return nil
}

// tracker records when each job reached a node.
type tracker struct {
	mu sync.Mutex
	at map[string]time.Time
}

func (t *tracker) mark(id string) {
	t.mu.Lock()
	if _, ok := t.at[id]; !ok {
		t.at[id] = time.Now()
	}
	t.mu.Unlock()
}

func (t *tracker) wait(id string, d time.Duration) time.Time {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		t.mu.Lock()
		at := t.at[id]
		t.mu.Unlock()
		if !at.IsZero() {
			return at
		}
		time.Sleep(200 * time.Microsecond)
	}
	return time.Time{}
}

func waitFor(d time.Duration, ok func() bool) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if ok() {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("not within %s", d)
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// procCPU reads a process's user+system time from /proc (clock ticks).
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndex(s, ")")+2:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond // USER_HZ 100
}

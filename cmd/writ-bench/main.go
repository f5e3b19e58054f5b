// Command writ-bench measures end-to-end signed-job throughput and latency
// (submit through coord → result back from coord) next to raw asynq (no-op
// handler) on the same redis-server in the same run, and prints the ratio.
//
// It builds the writ binary, starts a redis-server and `writ dev` (ledger,
// coord, supervisor, runner in one process) against it, and drives coord
// over HTTP. Envelopes are signed before the clock starts: signing is the
// user's work, not the fleet's. Run it with `make bench`.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
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
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hibiken/asynq"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/internal/redisproc"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/pki"
	"github.com/writ-fleet/writ/queue"
)

var (
	jobs         = flag.Int("jobs", 5000, "jobs per throughput run")
	inflight     = flag.Int("inflight", 64, "jobs in flight at once in throughput runs")
	rate         = flag.Int("rate", 500, "jobs per second in the latency runs")
	rateFor      = flag.Duration("rate-for", 10*time.Second, "length of the latency runs")
	concurrency  = flag.Int("concurrency", 10, "worker concurrency (runner and raw asynq alike)")
	poll         = flag.Duration("poll", queue.DefaultPollInterval, "idle poll interval (runner and raw asynq alike)")
	keep         = flag.Bool("keep", false, "keep the temporary directory")
	scaleRunners = flag.Int("scale-runners", 8, "runners in the scale-out run (0 skips it)")
	scaleJobs    = flag.Int("scale-jobs", 4000, "100 ms jobs in the scale-out run")
	showStages   = flag.Bool("stages", false, "print where a job's time goes in the throughput run (clocks of one machine)")
	profile      = flag.String("profile", "", "write a 10 s CPU profile of the fleet process taken during the throughput run")
	flowSteps    = flag.Int("flow-steps", 200, "steps of the flow chain and items of the flow fan-out measured against single jobs (0 skips them)")
	flowRuns     = flag.Int("flow-runs", 5, "times the flow chain and fan-out are each run (the median is compared)")
	flowKiB      = flag.Int("flow-kib", 512, "size of the flow whose fan-out's Redis cost is measured (0 skips it)")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "writ-bench:", err)
		os.Exit(1)
	}
}

func freePort() int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func run() error {
	dir, err := os.MkdirTemp("", "writ-bench-")
	if err != nil {
		return err
	}
	if !*keep {
		defer os.RemoveAll(dir)
	}
	fmt.Printf("machine: %s, %d CPUs (GOMAXPROCS %d), %s\n", hostInfo(), runtime.NumCPU(), runtime.GOMAXPROCS(0), runtime.Version())
	fmt.Printf("settings: %d jobs per throughput run, %d in flight; latency runs at %d jobs/s for %s; worker concurrency %d, poll %s\n",
		*jobs, *inflight, *rate, *rateFor, *concurrency, *poll)

	rp, err := redisproc.Start(redisproc.Config{Dir: dir, Port: freePort()})
	if err != nil {
		return err
	}
	defer rp.Stop()

	// ---- raw asynq ----
	rawTput, rawLat, err := rawAsynq(rp.Addr())
	if err != nil {
		return fmt.Errorf("raw asynq: %w", err)
	}
	fmt.Printf("raw asynq:  throughput %8.0f jobs/s   at %d/s: p50 %s  p99 %s\n", rawTput, *rate, rawLat.p(50), rawLat.p(99))

	// ---- writ end to end ----
	bin := filepath.Join(dir, "writ")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/writ").CombinedOutput(); err != nil {
		return fmt.Errorf("build writ: %v\n%s", err, out)
	}
	base := 20000 + freePort()%20000
	devDir := filepath.Join(dir, "dev")
	cmd := exec.Command(bin, "dev", "--dir", devDir, "--redis", rp.URL(), "--base-port", fmt.Sprint(base),
		"--concurrency", fmt.Sprint(*concurrency), "--log-level", envOrDefault("WRIT_BENCH_LOG", "warn"))
	logf, _ := os.Create(filepath.Join(dir, "dev.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "WRIT_PPROF=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	// writ dev serves HTTPS with its own CA (DIR/tls): the benchmark talks
	// to it as a fleet across hosts would, TLS and signed requests.
	coordURL := fmt.Sprintf("https://127.0.0.1:%d", base+2)
	caFile := filepath.Join(devDir, "tls", "ca.crt")
	var hc *http.Client
	deadline := time.Now().Add(30 * time.Second)
	for hc == nil && time.Now().Before(deadline) {
		// The CA and certificates appear once writ dev has made them.
		tc := &pki.Config{CA: caFile, Cert: filepath.Join(devDir, "tls", "runner-local.crt"), Key: filepath.Join(devDir, "tls", "runner-local.key")}
		if tc.Load() == nil {
			hc = tc.HTTPClient(0)
			tr := hc.Transport.(*http.Transport)
			tr.MaxIdleConnsPerHost, tr.MaxConnsPerHost = 1024, 0
		} else {
			time.Sleep(50 * time.Millisecond)
		}
	}
	if hc == nil {
		return fmt.Errorf("writ dev made no CA in %s", caFile)
	}
	if err := waitReady(hc, coordURL+"/readyz", 30*time.Second); err != nil {
		return fmt.Errorf("writ dev did not come up: %w (log: %s)", err, filepath.Join(dir, "dev.log"))
	}
	key, err := keys.Load(filepath.Join(devDir, "admin.key"))
	if err != nil {
		return err
	}
	cl := &coord.Client{BaseURL: coordURL, HTTP: hc, Key: key}
	// Warm up: caches, connections, the compiled script.
	if _, err := e2eThroughput(cl, key, 500); err != nil {
		return err
	}
	if *profile != "" {
		go func() {
			resp, err := hc.Get(coordURL + "/debug/pprof/profile?seconds=10")
			if err != nil {
				return
			}
			defer resp.Body.Close()
			f, _ := os.Create(*profile)
			io.Copy(f, resp.Body)
			f.Close()
		}()
	}
	if *showStages {
		stages = &stageTimes{}
	}
	cpu0 := machineCPU()
	e2eTput, err := e2eThroughput(cl, key, *jobs)
	if err != nil {
		return err
	}
	e2eCPU := (machineCPU() - cpu0) / time.Duration(*jobs)
	if stages != nil {
		fmt.Printf("mean stage times in the throughput run: %s\n", stages)
		stages = nil
	}
	e2eLat, err := e2eAtRate(cl, key)
	if err != nil {
		return err
	}
	fmt.Printf("writ e2e:   throughput %8.0f jobs/s   at %d/s: p50 %s  p99 %s   CPU per job %s (the machine's, all processes)\n", e2eTput, *rate, e2eLat.p(50), e2eLat.p(99), e2eCPU.Round(time.Microsecond))
	if *flowSteps > 0 {
		if err := flowBench(cl, key, *flowSteps, max(*flowRuns, 1)); err != nil {
			return fmt.Errorf("flows: %w", err)
		}
		if *flowKiB > 0 {
			if err := flowRedisBench(cl, key, rp.Addr(), *flowSteps, *flowKiB); err != nil {
				return fmt.Errorf("flow redis: %w", err)
			}
		}
	}
	if *scaleRunners > 0 {
		if err := scaleOut(bin, dir, rp.URL(), fmt.Sprintf("https://127.0.0.1:%d", base+1), caFile, cl, key); err != nil {
			return fmt.Errorf("scale-out: %w", err)
		}
	}
	fmt.Printf("p99 at %d/s e2e/raw-asynq: %.2f\n", *rate, float64(e2eLat.p(99))/float64(rawLat.p(99)))
	fmt.Printf("ratio e2e/raw-asynq throughput: %.2f\n", e2eTput/rawTput)
	return nil
}

// machineCPU is the CPU time the machine's processes have used since boot
// (user, nice, system, irq, softirq; not idle, iowait or steal), from
// /proc/stat. Per job it is a steadier figure than throughput on a shared
// machine, where other tenants take cores away (steal) at random.
func machineCPU() time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line) // cpu user nice system idle iowait irq softirq steal ...
	var ticks int64
	for _, i := range []int{1, 2, 3, 6, 7} {
		if i < len(f) {
			v, _ := strconv.ParseInt(f[i], 10, 64)
			ticks += v
		}
	}
	return time.Duration(ticks) * time.Second / 100 // USER_HZ is 100 on Linux
}

func hostInfo() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return runtime.GOOS + "/" + runtime.GOARCH
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "model name") {
			if _, v, ok := strings.Cut(line, ":"); ok {
				return strings.TrimSpace(v)
			}
		}
	}
	return runtime.GOARCH
}

func waitReady(hc *http.Client, url string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if resp, err := hc.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after %s", url, d)
}

// latencies is a set of samples.
type latencies []time.Duration

func (l latencies) p(pct int) time.Duration {
	if len(l) == 0 {
		return 0
	}
	s := append(latencies(nil), l...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := (len(s)*pct + 99) / 100
	return s[max(0, min(i, len(s))-1)].Round(10 * time.Microsecond)
}

// rawAsynq measures asynq alone: a no-op handler, enqueue and process at
// once, the same concurrency and poll interval as the runner.
func rawAsynq(addr string) (float64, latencies, error) {
	opt := asynq.RedisClientOpt{Addr: addr, PoolSize: 64}
	client := asynq.NewClient(opt)
	defer client.Close()
	var processed atomic.Int64
	var mu sync.Mutex
	var lat latencies
	recording := atomic.Bool{}
	srv := asynq.NewServer(opt, asynq.Config{
		Concurrency: *concurrency, TaskCheckInterval: *poll, LogLevel: asynq.ErrorLevel,
		Queues: map[string]int{"bench": 1},
	})
	done := make(chan struct{}, 1)
	var target atomic.Int64
	if err := srv.Start(asynq.HandlerFunc(func(ctx context.Context, t *asynq.Task) error {
		if recording.Load() {
			var sent int64
			json.Unmarshal(t.Payload(), &sent)
			d := time.Since(time.Unix(0, sent))
			mu.Lock()
			lat = append(lat, d)
			mu.Unlock()
		}
		if processed.Add(1) == target.Load() {
			select {
			case done <- struct{}{}:
			default:
			}
		}
		return nil
	})); err != nil {
		return 0, nil, err
	}
	defer srv.Shutdown()
	enqueue := func() error {
		p, _ := json.Marshal(time.Now().UnixNano())
		_, err := client.Enqueue(asynq.NewTask("noop", p), asynq.Queue("bench"))
		return err
	}
	// Throughput: enqueue *jobs tasks from *inflight goroutines while the
	// server processes them.
	processed.Store(0)
	target.Store(int64(*jobs))
	start := time.Now()
	var wg sync.WaitGroup
	var next atomic.Int64
	var firstErr atomic.Value
	for w := 0; w < *inflight; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(*jobs) {
				if err := enqueue(); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err, _ := firstErr.Load().(error); err != nil {
		return 0, nil, err
	}
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		return 0, nil, fmt.Errorf("raw asynq processed %d of %d", processed.Load(), *jobs)
	}
	tput := float64(*jobs) / time.Since(start).Seconds()

	// Latency at a fixed rate.
	n := int(float64(*rate) * rateFor.Seconds())
	processed.Store(0)
	target.Store(int64(n))
	recording.Store(true)
	paced(n, 0, func(time.Time) {
		if err := enqueue(); err != nil {
			firstErr.CompareAndSwap(nil, err)
		}
	})
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		return 0, nil, fmt.Errorf("raw asynq latency run processed %d of %d", processed.Load(), n)
	}
	return tput, lat, nil
}

// paced calls fn n times at *rate per second, each in its own goroutine,
// at most limit at once (0: no limit), and waits for all of them. fn is
// given the time its call was due: a call that waited for a slot counts
// its wait (no coordinated omission). It returns how many calls waited.
func paced(n, limit int, fn func(due time.Time)) (waited int) {
	interval := time.Second / time.Duration(*rate)
	start := time.Now()
	var wg sync.WaitGroup
	var slots chan struct{}
	if limit > 0 {
		slots = make(chan struct{}, limit)
	}
	for i := 0; i < n; i++ {
		due := start.Add(time.Duration(i) * interval)
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
		if slots != nil {
			select {
			case slots <- struct{}{}:
			default:
				waited++
				slots <- struct{}{}
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(due)
			if slots != nil {
				<-slots
			}
		}()
	}
	wg.Wait()
	return waited
}

const benchScript = `job := import("job"); job.result(job.args.i)`

// sleepScript is the scale-out job: 100 ms of waiting, no CPU.
const sleepScript = `job := import("job"); times := import("times"); times.sleep(100 * times.millisecond); job.result(job.args.i)`

// scaleOut adds runners (each --concurrency workers) next to the one in
// writ dev and runs 100 ms jobs: the ideal is runners × concurrency × 10
// jobs/s.
func scaleOut(bin, dir, redisURL, ledgerURL, caFile string, cl *coord.Client, k *keys.Key) error {
	for i := 1; i < *scaleRunners; i++ {
		cmd := exec.Command(bin, "runner", "--site", "local", "--node", fmt.Sprintf("bench-%d", i), "--redis", redisURL,
			"--ledger", ledgerURL, "--ca", caFile, "--listen", "", "--concurrency", fmt.Sprint(*concurrency), "--log-level", envOrDefault("WRIT_BENCH_LOG", "warn"))
		logf, _ := os.Create(filepath.Join(dir, fmt.Sprintf("runner-%d.log", i)))
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			return err
		}
		defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	}
	time.Sleep(2 * time.Second) // let the runners connect
	raws := make([][]byte, *scaleJobs)
	now := time.Now()
	for i := range raws {
		j := envelope.NewJob("scale", sleepScript, "local", now)
		j.Args = json.RawMessage(fmt.Sprintf(`{"i":%d}`, i))
		env, err := j.Sign(k)
		if err != nil {
			return err
		}
		raws[i], _ = json.Marshal(env)
	}
	workers := *scaleRunners * *concurrency
	ideal := float64(workers) * 10
	if *showStages {
		stages = &stageTimes{}
		defer func() { fmt.Printf("scale-out mean stage times: %s\n", stages); stages = nil }()
	}
	// Twice the workers in flight keeps every worker busy.
	cpu0 := machineCPU()
	got, err := runAll(cl, raws, 2*workers)
	if err != nil {
		return err
	}
	cpu := (machineCPU() - cpu0) / time.Duration(len(raws))

	fmt.Printf("scale-out:  %d runners x %d workers on 100 ms jobs: %.0f jobs/s of %.0f ideal (%.0f%%), CPU per job %s\n", *scaleRunners, *concurrency, got, ideal, 100*got/ideal, cpu.Round(time.Microsecond))
	return nil
}

// signAll signs n jobs before any clock starts.
func signAll(k *keys.Key, n int) ([][]byte, error) {
	out := make([][]byte, n)
	now := time.Now()
	for i := range out {
		j := envelope.NewJob("bench", benchScript, "local", now)
		j.Args = json.RawMessage(fmt.Sprintf(`{"i":%d}`, i))
		env, err := j.Sign(k)
		if err != nil {
			return nil, err
		}
		if out[i], err = json.Marshal(env); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// stageTimes sums where a job's time went (see -stages).
type stageTimes struct {
	mu  sync.Mutex
	n   int
	sum [5]time.Duration
}

var stages *stageTimes

func (s *stageTimes) add(d ...time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.n++
	for i := range d {
		s.sum[i] += d[i]
	}
}

func (s *stageTimes) String() string {
	if s.n == 0 {
		return "no samples"
	}
	names := []string{"client→coord", "coord→queued", "queued→started", "run", "finished→client"}
	var b strings.Builder
	for i, n := range names {
		fmt.Fprintf(&b, "%s %s  ", n, (s.sum[i] / time.Duration(s.n)).Round(10*time.Microsecond))
	}
	return b.String()
}

// oneJob submits an envelope and waits for its result through coord.
func oneJob(cl *coord.Client, raw []byte) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	j, err := cl.SubmitWait(ctx, raw, time.Minute)
	if err != nil {
		return 0, err
	}
	rep := j
	if stages != nil && j.QueuedAt != nil && j.StartedAt != nil && j.FinishedAt != nil {
		end := time.Now()
		stages.add(j.SubmittedAt.Sub(start), j.QueuedAt.Sub(j.SubmittedAt), j.StartedAt.Sub(*j.QueuedAt), j.FinishedAt.Sub(*j.StartedAt), end.Sub(*j.FinishedAt))
	}
	if j.State != job.StateSucceeded {
		var evs []string
		wctx, wcancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer wcancel()
		cl.Watch(wctx, rep.ID, func(ev job.Event) bool { evs = append(evs, string(ev.Type)+"@"+ev.Seq); return true })
		return 0, fmt.Errorf("job %s ended %s: %s (submit reply %+v; events %v)", rep.ID, j.State, j.Error, rep, evs)
	}
	return time.Since(start), nil
}

// e2eThroughput runs n jobs with *inflight in flight and returns jobs/s.
func e2eThroughput(cl *coord.Client, k *keys.Key, n int) (float64, error) {
	raws, err := signAll(k, n)
	if err != nil {
		return 0, err
	}
	return runAll(cl, raws, *inflight)
}

// runAll runs every envelope through coord with inflight at once and
// returns jobs/s.
func runAll(cl *coord.Client, raws [][]byte, inflight int) (float64, error) {
	var next atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < inflight; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(len(raws)) {
					return
				}
				if _, err := oneJob(cl, raws[i]); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err, _ := firstErr.Load().(error); err != nil {
		return 0, err
	}
	return float64(len(raws)) / time.Since(start).Seconds(), nil
}

// e2eAtRate submits at *rate jobs/s and returns submit→done latencies.
func e2eAtRate(cl *coord.Client, k *keys.Key) (latencies, error) {
	n := int(float64(*rate) * rateFor.Seconds())
	raws, err := signAll(k, n)
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex
	var lat latencies
	var firstErr atomic.Value
	var i atomic.Int64
	// coord lets one user hold at most 256 waits open: a fleet slower
	// than the rate makes the generator wait for a slot (counted, and in
	// the latencies) rather than be refused.
	waited := paced(n, coord.DefaultStreamsPerUser-16, func(due time.Time) {
		_, err := oneJob(cl, raws[i.Add(1)-1])
		if err != nil {
			firstErr.CompareAndSwap(nil, err)
			return
		}
		mu.Lock()
		lat = append(lat, time.Since(due))
		mu.Unlock()
	})
	if err, _ := firstErr.Load().(error); err != nil {
		return nil, err
	}
	if waited > 0 {
		fmt.Printf("writ e2e:   the fleet fell behind %d jobs/s: %d of %d jobs waited for one of %d submissions in flight (their wait is in the latencies)\n",
			*rate, waited, n, coord.DefaultStreamsPerUser-16)
	}
	return lat, nil
}

package e2e

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/redis/go-redis/v9"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/envelope"
	assembly "github.com/writ-fleet/writ/internal/fleet"
	"github.com/writ-fleet/writ/internal/redisproc"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/pki"
	"github.com/writ-fleet/writ/queue"
)

// chaosSite is the site of the chaos fleet.
const chaosSite = "lab"

// TestChaos is `make chaos`: a whole fleet as hosts (network namespaces on
// one LAN: the ledger; coord's host with its Redis and two coords; the
// site's host with its supervisor and a Sentinel-watched Redis of a
// primary, two replicas and three sentinels; two nodes' runners) runs
// WRIT_CHAOS_JOBS signed jobs (half of them 300 ms long) submitted at a
// steady rate by a client that retries through either coord, while
//
//  1. every component is killed -9 at random times, twice each, and
//     started again (runners, supervisor, both coords, coord's Redis,
//     the ledger);
//  2. the site's Redis primary is killed -9 (Sentinel fails over) and
//     comes back as a replica;
//  3. coord's host is cut from the supervisor (an nftables drop in its
//     namespace) for 30 s;
//  4. a node is cut from the site's Redis, mid-job, for 45 s;
//  5. the ledger is down for five minutes (WRIT_CHAOS_LEDGER_OUTAGE).
//
// Then every accepted job must have succeeded exactly once: it prints
// "chaos: N accepted, S succeeded, F failed, K stuck, L lost, D doubled".
// WRIT_CHAOS_SEED replays a schedule.
func TestChaos(t *testing.T) {
	total, _ := strconv.Atoi(os.Getenv("WRIT_CHAOS_JOBS"))
	if total <= 0 {
		t.Skip("the chaos suite runs with make chaos (WRIT_CHAOS_JOBS=5000; about 12 minutes)")
	}
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, "nsenter")
	testenv.RequireBinary(t, "redis-server")
	outage := 5 * time.Minute
	if v := os.Getenv("WRIT_CHAOS_LEDGER_OUTAGE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("WRIT_CHAOS_LEDGER_OUTAGE: %v", err)
		}
		outage = d
	}
	seed := time.Now().UnixNano()
	if v := os.Getenv("WRIT_CHAOS_SEED"); v != "" {
		seed, _ = strconv.ParseInt(v, 10, 64)
	}
	rng := rand.New(rand.NewSource(seed))
	t.Logf("seed %d (WRIT_CHAOS_SEED replays this schedule)", seed)

	c := newChaosFleet(t)

	// The schedule, built first so the client can spread the jobs over it.
	type step struct {
		what string
		at   time.Duration // after the previous step
		do   func()
	}
	var steps []step
	var kills []string
	for _, name := range []string{"runner:n1", "runner:n2", "supervisor", "coord-a", "coord-b", "coord-redis", "ledger"} {
		kills = append(kills, name, name)
	}
	rng.Shuffle(len(kills), func(i, j int) { kills[i], kills[j] = kills[j], kills[i] })
	for _, name := range kills {
		name, down := name, time.Duration(500+rng.Intn(2500))*time.Millisecond
		steps = append(steps, step{"kill -9 " + name, time.Duration(3000+rng.Intn(4000)) * time.Millisecond, func() { c.kill(name, down) }})
	}
	steps = append(steps,
		step{"kill -9 the site's Redis primary (Sentinel failover)", 10 * time.Second, c.failover},
		step{"cut coord's host from the supervisor for 30 s", 20 * time.Second, func() {
			c.partition("coord", c.ip["site"], 7703, 30*time.Second)
		}},
		step{"cut node n1 from the site's Redis for 45 s", 10 * time.Second, func() {
			c.partition("node1", c.ip["site"], 0, 45*time.Second)
		}},
		step{fmt.Sprintf("the ledger down for %s", outage), 10 * time.Second, func() {
			c.kill("ledger", outage)
		}},
	)
	var plan time.Duration
	for _, s := range steps {
		plan += s.at
	}
	plan += 20 * time.Second // jobs after the last step
	plan += 2 * time.Minute  // the steps' own durations, roughly
	plan += outage

	// The client: jobs at a steady rate, each submitted until accepted.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var (
		mu       sync.Mutex
		accepted []string
		how      = map[string]string{} // job ID: when and where it was accepted
		refused  []string
		retries  atomic.Int64
	)
	every := plan / time.Duration(total)
	work := make(chan []byte, 64)
	var wg sync.WaitGroup
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for env := range work {
				for attempt := 0; ; attempt++ {
					cl := c.clients[attempt%len(c.clients)]
					sctx, scancel := context.WithTimeout(ctx, 20*time.Second)
					rep, err := cl.Submit(sctx, env)
					scancel()
					if err == nil {
						mu.Lock()
						accepted = append(accepted, rep.ID)
						how[rep.ID] = fmt.Sprintf("accepted %s at %.1fs by %s", rep.State, time.Since(c.born).Seconds(), cl.BaseURL)
						mu.Unlock()
						break
					}
					var rej *coord.RejectedError
					if errors.As(err, &rej) && rej.Status < 500 {
						mu.Lock()
						refused = append(refused, fmt.Sprintf("%s: %v", rej.Reply.ID, err))
						mu.Unlock()
						break
					}
					if ctx.Err() != nil {
						return
					}
					retries.Add(1)
					time.Sleep(500 * time.Millisecond)
				}
			}
		}()
	}
	quick := `job := import("job"); job.result("ok")`
	slow := `job := import("job"); times := import("times"); times.sleep(300 * times.millisecond); job.result("slow")`
	genDone := make(chan struct{})
	go func() {
		defer close(genDone)
		defer close(work)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for i := 0; i < total; i++ {
			script := quick
			if i%2 == 1 {
				script = slow
			}
			j := envelope.NewJob(fmt.Sprintf("chaos-%d", i), script, chaosSite, time.Now())
			j.Expires = time.Now().Add(3 * time.Hour).UTC().Truncate(time.Second)
			select {
			case work <- rawEnvelope(t, j, c.admin):
			case <-ctx.Done():
				return
			}
			<-tick.C
		}
	}()

	start := c.born
	for _, s := range steps {
		time.Sleep(s.at)
		t.Logf("%6.1fs  %s", time.Since(start).Seconds(), s.what)
		s.do()
	}
	t.Logf("%6.1fs  schedule done; the client submits what is left", time.Since(start).Seconds())
	<-genDone
	wg.Wait()
	t.Logf("%6.1fs  every job submitted (%d retries)", time.Since(start).Seconds(), retries.Load())

	// Every accepted job ends; then its events are counted in coord's
	// records (what users see).
	var succeeded, failed, stuck, lost, doubled, again int
	deadline := time.Now().Add(6 * time.Minute)
	rdb := c.coordRedis(t)
	for _, id := range accepted {
		var rec *job.Record
		for {
			jctx, jcancel := context.WithTimeout(ctx, 30*time.Second)
			r, err := c.clients[0].Job(jctx, id, 20*time.Second)
			jcancel()
			if err == nil && r.State.Terminal() {
				rec = r
				break
			}
			if err != nil && isNotFound(err) {
				break
			}
			if time.Now().After(deadline) {
				rec = r
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		switch {
		case rec == nil:
			lost++
			t.Errorf("job %s (%s): coord knows nothing of it", id, how[id])
			continue
		case !rec.State.Terminal():
			stuck++
			t.Errorf("job %s: still %s", id, rec.State)
			continue
		case rec.State == job.StateSucceeded:
			succeeded++
		default:
			failed++
			t.Errorf("job %s: %s (%s)", id, rec.State, rec.Error)
		}
		evs, err := rdb.JobEvents(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		ends, starts := 0, 0
		for _, ev := range evs {
			if ev.Type.Terminal() {
				ends++
			}
			if ev.Type == job.EventStarted {
				starts++
			}
		}
		if ends > 1 {
			doubled++
			t.Errorf("job %s: %d terminal events", id, ends)
		}
		if starts > 1 {
			again++
		}
	}
	t.Logf("%6.1fs  checked; %d jobs started more than once (at-least-once starts), %d client retries", time.Since(start).Seconds(), again, retries.Load())
	for _, r := range refused {
		t.Errorf("refused: %s", r)
	}
	line := fmt.Sprintf("chaos: %d accepted, %d succeeded, %d failed, %d stuck, %d lost, %d doubled", len(accepted), succeeded, failed, stuck, lost, doubled)
	fmt.Println(line)
	t.Log(line)
	if len(accepted)+len(refused) != total {
		t.Errorf("%d of %d jobs accepted or refused", len(accepted)+len(refused), total)
	}
	if succeeded != len(accepted) {
		t.Errorf("%d of %d accepted jobs succeeded", succeeded, len(accepted))
	}
}

// isNotFound: coord answered that it has no such job.
func isNotFound(err error) bool { return strings.Contains(err.Error(), "(HTTP 404)") }

// chaosFleet is the fleet TestChaos runs: its hosts, processes and how to
// start each again.
type chaosFleet struct {
	t       *testing.T
	f       *fleet
	hn      *hostNet
	ip      map[string]string
	admin   *keys.Key
	clients []*coord.Client
	restart map[string]func()
	procs   map[string]func() // kill -9
	mu      sync.Mutex
	data    map[string]*redisproc.Process // the site's Redis servers by address
	dataCfg map[string]redisproc.Config
	pass    map[string]string
	sentAt  []string // sentinel addresses
	born    time.Time
	all     []*proc // every process started, for the logs
}

func newChaosFleet(t *testing.T) *chaosFleet {
	t.Helper()
	f := &fleet{t: t, dir: t.TempDir(), procs: map[string]*proc{}, ports: map[string]int{}}
	c := &chaosFleet{t: t, f: f, hn: newHostNet(t), ip: map[string]string{}, restart: map[string]func(){}, procs: map[string]func(){},
		data: map[string]*redisproc.Process{}, dataCfg: map[string]redisproc.Config{}}
	for i, h := range []string{"ledger", "coord", "site", "node1", "node2", "client"} {
		c.ip[h] = c.hn.host(h, i+1)
	}
	d := f.dir

	// A CA and one certificate per service, valid for every host.
	caDir := filepath.Join(d, "ca")
	ca, err := assembly.OpenCA(caDir, "writ-chaos-ca")
	if err != nil {
		t.Fatal(err)
	}
	var ips []string
	for _, a := range c.ip {
		ips = append(ips, a)
	}
	for _, name := range []string{"ledger", "coord", "supervisor", "runner"} {
		if _, _, err := ca.Issue(name, ips...); err != nil {
			t.Fatal(err)
		}
	}
	caFile := filepath.Join(caDir, pki.CACertFile)
	crt := func(name string) []string {
		return []string{"--tls-cert", filepath.Join(caDir, name+".crt"), "--tls-key", filepath.Join(caDir, name+".key")}
	}
	pool, err := pki.LoadPool(caFile)
	if err != nil {
		t.Fatal(err)
	}

	// The client host's HTTPS client (its sockets are opened inside the
	// client's namespace).
	clientNS := c.hn.hosts["client"]
	hc := &http.Client{Transport: &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool},
		DialContext:         nsDialer(t, clientNS),
		MaxIdleConnsPerHost: 64,
	}}
	if c.admin, err = keys.Generate("admin@chaos"); err != nil {
		t.Fatal(err)
	}
	adminKey := filepath.Join(d, "admin.key")
	if err := c.admin.Save(adminKey); err != nil {
		t.Fatal(err)
	}
	ledgerURL := "https://" + c.ip["ledger"] + ":7701"
	supURL := "https://" + c.ip["site"] + ":7703"
	coordURLs := []string{"https://" + c.ip["coord"] + ":7702", "https://" + c.ip["coord"] + ":7712"}
	for _, u := range coordURLs {
		c.clients = append(c.clients, &coord.Client{BaseURL: u, Key: c.admin, HTTP: hc})
	}

	// writ services on their hosts, each restartable.
	service := func(host, name string, env []string, args ...string) {
		env = append([]string{"WRIT_CA=" + caFile}, env...)
		start := func() {
			p := f.startCmd(name, c.hn.cmd(host, env, writBin, append(args, "--log-level", "info")...))
			c.mu.Lock()
			c.all = append(c.all, p)
			c.procs[name] = func() { p.cmd.Process.Kill(); <-p.done }
			c.mu.Unlock()
		}
		c.restart[name] = start
		start()
	}

	// Redis: coord's (one server, every write fsynced) and the site's.
	c.pass = map[string]string{queue.ACLCoord: "coord-" + randomWord(t), queue.ACLSupervisor: "sup-" + randomWord(t), queue.ACLRunner: "run-" + randomWord(t)}
	internal := "internal-" + randomWord(t)
	redisOn := func(host string, port int, cfg redisproc.Config, roles ...string) redisproc.Config {
		users, err := assembly.RedisUsers(chaosSite, c.pass, roles...)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Users = append(cfg.Users, users...)
		cfg.Dir = filepath.Join(d, fmt.Sprintf("redis-%s-%d", host, port))
		os.MkdirAll(cfg.Dir, 0o700)
		cfg.Port, cfg.Bind = port, c.ip[host]
		cfg.Wrap = []string{"nsenter", "--net=" + testenv.NetNSPath(c.hn.hosts[host])}
		ns := c.hn.hosts[host]
		cfg.Dial = func(addr string) (conn net.Conn, err error) {
			testenv.InNetNS(t, ns, func() error {
				conn, err = net.DialTimeout("tcp", addr, 200*time.Millisecond)
				return nil
			})
			return conn, err
		}
		return cfg
	}
	startRedis := func(cfg redisproc.Config) *redisproc.Process {
		p, err := redisproc.Start(cfg)
		if err != nil {
			t.Fatalf("redis on %s:%d: %v", cfg.Bind, cfg.Port, err)
		}
		t.Cleanup(p.Stop)
		return p
	}
	coordCfg := redisOn("coord", 6379, redisproc.Config{Persist: true, Fsync: "always"}, queue.ACLCoord)
	cr := startRedis(coordCfg)
	c.procs["coord-redis"] = cr.Kill
	c.restart["coord-redis"] = func() {
		p := startRedis(coordCfg)
		c.mu.Lock()
		c.procs["coord-redis"] = p.Kill
		c.mu.Unlock()
	}
	siteUsers := []string{queue.ACLSupervisor, queue.ACLRunner}
	primary := c.ip["site"] + ":6379"
	for i, port := range []int{6379, 6380, 6381} {
		cfg := redisproc.Config{Persist: true, Fsync: "always", Internal: internal}
		if i > 0 {
			cfg.ReplicaOf = primary
		}
		cfg = redisOn("site", port, cfg, siteUsers...)
		p := startRedis(cfg)
		c.data[p.Addr()], c.dataCfg[p.Addr()] = p, cfg
	}
	for _, port := range []int{26379, 26380, 26381} {
		cfg := redisOn("site", port, redisproc.Config{Internal: internal, Sentinel: &redisproc.Sentinel{
			Master: "writ", Primary: primary, Quorum: 2, DownAfter: 2 * time.Second}}, siteUsers...)
		p := startRedis(cfg)
		c.sentAt = append(c.sentAt, p.Addr())
	}
	siteRedis := func(user string) string {
		return "redis+sentinel://" + user + "@" + c.sentAt[0] + "/0?master_name=writ&addr=" + c.sentAt[1] + "&addr=" + c.sentAt[2]
	}
	testenv.WaitFor(t, 30*time.Second, "the sentinels to see both replicas", func() bool {
		reps, err := c.sentinel().Replicas(context.Background(), "writ").Result()
		return err == nil && len(reps) == 2
	})

	// The ledger, the supervisor, two coords and two runners.
	db := filepath.Join(d, "ledger.db")
	f.run("ledger", "init", "--db", db, "--admin-key", adminKey+".pub", "--site", chaosSite, "--supervisor", supURL)
	service("ledger", "ledger", nil, append([]string{"ledger", "serve", "--db", db, "--listen", c.ip["ledger"] + ":7701"}, crt("ledger")...)...)
	pw := func(role string) []string { return []string{"WRIT_REDIS_PASSWORD=" + c.pass[role]} }
	service("site", "supervisor", pw(queue.ACLSupervisor), append([]string{"supervisor", "--site", chaosSite, "--listen", c.ip["site"] + ":7703",
		"--redis", siteRedis(queue.ACLSupervisor), "--ledger", ledgerURL, "--trust-ttl", "1s"}, crt("supervisor")...)...)
	for i, name := range []string{"coord-a", "coord-b"} {
		service("coord", name, pw(queue.ACLCoord), append([]string{"coord", "--listen", c.ip["coord"] + ":" + strconv.Itoa(7702+10*i),
			"--redis", "redis://coord@" + c.ip["coord"] + ":6379/0", "--ledger", ledgerURL}, crt("coord")...)...)
	}
	for i, n := range []string{"n1", "n2"} {
		service(fmt.Sprintf("node%d", i+1), "runner:"+n, pw(queue.ACLRunner), "runner", "--site", chaosSite, "--node", n,
			"--redis", siteRedis(queue.ACLRunner), "--ledger", ledgerURL, "--listen", "", "--concurrency", "4",
			"--trust-ttl", "1s", "--no-network", "--no-vm")
	}
	// Ready: a job through each coord succeeds.
	for _, cl := range c.clients {
		testenv.WaitFor(t, 60*time.Second, "a first job through "+cl.BaseURL, func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			rec, err := cl.SubmitWait(ctx, rawEnvelope(t, envelope.NewJob("ready", `job := import("job"); job.result(1)`, chaosSite, time.Now()), c.admin), 8*time.Second)
			return err == nil && rec.State == job.StateSucceeded
		})
	}
	// WRIT_CHAOS_LOGS=DIR keeps every process's whole log there.
	if dir := os.Getenv("WRIT_CHAOS_LOGS"); dir != "" {
		t.Cleanup(func() {
			os.MkdirAll(dir, 0o755)
			c.mu.Lock()
			defer c.mu.Unlock()
			for i, p := range c.all {
				os.WriteFile(filepath.Join(dir, fmt.Sprintf("%02d-%s.log", i, strings.ReplaceAll(p.name, ":", "-"))), p.log.Bytes(), 0o644)
			}
		})
	}
	c.born = time.Now()
	return c
}

// kill kills a component -9 and starts it again after down.
func (c *chaosFleet) kill(name string, down time.Duration) {
	c.mu.Lock()
	k := c.procs[name]
	c.mu.Unlock()
	k()
	time.Sleep(down)
	c.restart[name]()
}

// sentinel is a client of the first sentinel, from the site's host.
func (c *chaosFleet) sentinel() *redis.SentinelClient {
	return redis.NewSentinelClient(&redis.Options{Addr: c.sentAt[0], Username: queue.ACLRunner, Password: c.pass[queue.ACLRunner],
		Dialer: nsDialer(c.t, c.hn.hosts["site"])})
}

// failover kills the site's primary -9, waits for Sentinel to promote a
// replica, and starts the old primary again as the new one's replica.
func (c *chaosFleet) failover() {
	t := c.t
	sc := c.sentinel()
	defer sc.Close()
	ctx := context.Background()
	addr, err := sc.GetMasterAddrByName(ctx, "writ").Result()
	if err != nil {
		t.Fatalf("the primary's address: %v", err)
	}
	old := net.JoinHostPort(addr[0], addr[1])
	c.data[old].Kill()
	killed := time.Now()
	var now string
	testenv.WaitFor(t, 60*time.Second, "Sentinel to promote a replica", func() bool {
		a, err := sc.GetMasterAddrByName(ctx, "writ").Result()
		if err != nil {
			return false
		}
		now = net.JoinHostPort(a[0], a[1])
		return now != old
	})
	t.Logf("        %s promoted %s after the kill", now, time.Since(killed).Round(100*time.Millisecond))
	cfg := c.dataCfg[old]
	cfg.ReplicaOf = now
	p, err := redisproc.Start(cfg)
	if err != nil {
		t.Fatalf("the old primary as a replica: %v", err)
	}
	t.Cleanup(p.Stop)
	c.data[old], c.dataCfg[old] = p, cfg
}

// partition drops, in host's namespace, every TCP packet it sends to ip
// (to port only, when not zero) for d: established connections stall as
// on a cut cable, new ones time out.
func (c *chaosFleet) partition(host, ip string, port uint16, d time.Duration) {
	t := c.t
	nft, err := nftables.New(nftables.WithNetNSFd(int(c.hn.hosts[host])))
	if err != nil {
		t.Fatal(err)
	}
	table := &nftables.Table{Family: nftables.TableFamilyINet, Name: "chaos"}
	nft.AddTable(table)
	hook, prio, policy := *nftables.ChainHookOutput, *nftables.ChainPriorityFilter, nftables.ChainPolicyAccept
	ch := nft.AddChain(&nftables.Chain{Name: "out", Table: table, Type: nftables.ChainTypeFilter, Hooknum: &hook, Priority: &prio, Policy: &policy})
	exprs := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: netip.MustParseAddr(ip).AsSlice()},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	}
	if port != 0 {
		exprs = append(exprs,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, port)})
	}
	exprs = append(exprs, &expr.Verdict{Kind: expr.VerdictDrop})
	nft.AddRule(&nftables.Rule{Table: table, Chain: ch, Exprs: exprs})
	if err := nft.Flush(); err != nil {
		t.Fatalf("partition %s from %s: %v", host, ip, err)
	}
	time.Sleep(d)
	nft.DelTable(table)
	if err := nft.Flush(); err != nil {
		t.Fatalf("heal %s: %v", host, err)
	}
}

// coordRedis is a client of coord's Redis, from coord's host.
func (c *chaosFleet) coordRedis(t *testing.T) *queue.Redis {
	d := nsDialer(t, c.hn.hosts["coord"])
	r, err := queue.Dial("redis://coord@"+c.ip["coord"]+":6379/0", queue.Credentials{Password: c.pass[queue.ACLCoord], Dialer: d})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// nsDialer dials TCP from inside ns.
func nsDialer(t testing.TB, ns netns.NsHandle) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (conn net.Conn, err error) {
		testenv.InNetNS(t, ns, func() error {
			conn, err = (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
			return nil
		})
		return conn, err
	}
}

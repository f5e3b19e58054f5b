package e2e

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	assembly "github.com/writ-fleet/writ/internal/fleet"
	"github.com/writ-fleet/writ/internal/redisproc"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/keys"
	"github.com/writ-fleet/writ/pki"
	"github.com/writ-fleet/writ/queue"
)

// hostNet is a LAN of network namespaces ("hosts") on one bridge.
type hostNet struct {
	t     *testing.T
	sw    netns.NsHandle
	hosts map[string]netns.NsHandle
	addrs map[string]string
}

func newHostNet(t *testing.T) *hostNet {
	sw := testenv.NewNetNS(t)
	if err := testenv.InNetNS(t, sw, func() error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "lan"}}
		if err := netlink.LinkAdd(br); err != nil {
			return err
		}
		// The LAN's gateway, for both families: every host routes by
		// default through it, as a real one does.
		for _, a := range []string{lanGateway + "/24", lanGateway6 + "/64"} {
			addr, _ := netlink.ParseAddr(a)
			addr.Flags = 0x02 // IFA_F_NODAD
			if err := netlink.AddrAdd(br, addr); err != nil {
				return err
			}
		}
		return netlink.LinkSetUp(br)
	}); err != nil {
		t.Fatalf("LAN bridge: %v", err)
	}
	return &hostNet{t: t, sw: sw, hosts: map[string]netns.NsHandle{}, addrs: map[string]string{}}
}

// The LAN's gateway addresses (on the switch's bridge).
const (
	lanGateway  = "10.77.0.254"
	lanGateway6 = "fd77::fe"
)

// host plugs a host with addresses 10.77.0.N and fd77::N into the LAN,
// with default routes for both families through the LAN's gateway.
func (h *hostNet) host(name string, n int) string {
	addr := fmt.Sprintf("10.77.0.%d", n)
	ns := testenv.PlugGuest(h.t, h.sw, "v-"+name, "lan", netip.MustParsePrefix(addr+"/24"), netip.MustParseAddr(lanGateway))
	if err := testenv.InNetNS(h.t, ns, func() error {
		eth0, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		a, _ := netlink.ParseAddr(fmt.Sprintf("fd77::%x/64", n))
		a.Flags = 0x02 // IFA_F_NODAD
		if err := netlink.AddrAdd(eth0, a); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: net.ParseIP(lanGateway6)})
	}); err != nil {
		h.t.Fatalf("host %s: IPv6: %v", name, err)
	}
	h.hosts[name] = ns
	h.addrs[name] = addr
	return addr
}

// cmd is writ (or another program) run on host.
func (h *hostNet) cmd(host string, env []string, prog string, args ...string) *exec.Cmd {
	c := exec.Command("nsenter", append([]string{"--net=" + testenv.NetNSPath(h.hosts[host]), prog}, args...)...)
	c.Env = append(os.Environ(), env...)
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return c
}

// run runs writ on host to completion and returns its combined output.
func (h *hostNet) run(host string, env []string, args ...string) (string, error) {
	out, err := h.cmd(host, env, writBin, args...).CombinedOutput()
	return string(out), err
}

// raw speaks TLS from host to addr (bounded at five seconds) and returns
// what the server answered to req; all of it runs on a thread inside the
// host's namespace, so the socket is the host's.
func (h *hostNet) raw(host, addr string, tc *tls.Config, req string) (string, error) {
	var out string
	err := testenv.InNetNS(h.t, h.hosts[host], func() error {
		d := &net.Dialer{Timeout: 5 * time.Second}
		conn, err := tls.DialWithDialer(d, "tcp", addr, tc)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(conn, req); err != nil {
			return err
		}
		b, err := io.ReadAll(bufio.NewReader(conn))
		out = string(b)
		if len(out) > 0 {
			return nil
		}
		return err
	})
	return out, err
}

// TestFleet_Hosts runs the fleet as separate hosts: the ledger, coord (and
// its Redis), a site's Redis and supervisor, and two nodes, each in its own
// network namespace with its own address on a shared bridge, talking only
// HTTPS and rediss:// with a CA made by writ ca. From a stranger's host,
// Redis without credentials, an unsigned read, another user's job, a
// batch without coord's certificate and a client trusting another CA are
// all refused. A job with --secret reads its secret, and the value is in no
// Redis file, service log, process list or record.
func TestFleet_Hosts(t *testing.T) {
	slow(t)
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, "nsenter")
	testenv.RequireBinary(t, "redis-server")
	t.Parallel()
	f := &fleet{t: t, dir: t.TempDir(), procs: map[string]*proc{}, ports: map[string]int{}}
	d := f.dir
	hn := newHostNet(t)
	ledgerIP, coordIP, siteIP := hn.host("ledger", 1), hn.host("coord", 2), hn.host("site", 3)
	hn.host("node1", 4)
	hn.host("node2", 5)
	hn.host("admin", 8)
	strangerIP := hn.host("stranger", 9)

	// The CA and every service's certificate, with writ ca.
	caDir := filepath.Join(d, "ca")
	caFile := filepath.Join(caDir, pki.CACertFile)
	f.run("ca", "init", "--dir", caDir)
	for name, ip := range map[string]string{"ledger": ledgerIP, "coord": coordIP, "supervisor-lab": siteIP, "redis-lab": siteIP, "redis-coord": coordIP, "outsider": strangerIP} {
		f.run("ca", "issue", name, "--dir", caDir, "--ip", ip)
	}
	crt := func(name string) []string {
		return []string{"--tls-cert", filepath.Join(caDir, name+".crt"), "--tls-key", filepath.Join(caDir, name+".key")}
	}
	caEnv := []string{"WRIT_CA=" + caFile}
	ledgerURL, coordURL := "https://"+ledgerIP+":7701", "https://"+coordIP+":7702"

	// Users: the admin, alice (deploys on lab), bob (deploys elsewhere).
	keyOf := func(name string) string {
		k, _ := keys.Generate(name)
		p := filepath.Join(d, name+".key")
		if err := k.Save(p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	adminKey, aliceKey, bobKey := keyOf("admin"), keyOf("alice"), keyOf("bob")
	strangerKey := keyOf("stranger")

	// The ledger's host.
	db := filepath.Join(d, "ledger.db")
	f.run("ledger", "init", "--db", db, "--admin-key", adminKey+".pub", "--site", "lab", "--supervisor", "https://"+siteIP+":7703")
	start := func(host, name string, env []string, args ...string) *proc {
		return f.startCmd(name, hn.cmd(host, append(append([]string(nil), caEnv...), env...), writBin, append(args, "--log-level", "debug")...))
	}
	start("ledger", "ledger", nil, append([]string{"ledger", "serve", "--db", db, "--listen", ledgerIP + ":7701"}, crt("ledger")...)...)
	admin := func(args ...string) string {
		t.Helper()
		out, err := hn.run("admin", caEnv, append(args, "--ledger", ledgerURL, "--key", adminKey)...)
		if err != nil {
			t.Fatalf("writ %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	testenv.WaitFor(t, 30*time.Second, "the ledger over HTTPS", func() bool {
		_, err := hn.run("admin", caEnv, "site", "ls", "--ledger", ledgerURL)
		return err == nil
	})
	admin("user", "add", "alice", "--pubkey", aliceKey+".pub", "--role", "lab=deployer")
	admin("site", "set", "other", "--supervisor", "https://10.77.0.99:7703")
	admin("user", "add", "bob", "--pubkey", bobKey+".pub", "--role", "other=deployer")
	tokOut := admin("site", "token", "create", "lab", "--uses", "2")
	token := ""
	for _, w := range strings.Fields(tokOut) {
		if strings.HasPrefix(w, "writ-enroll-") {
			token = w
		}
	}
	if token == "" {
		t.Fatalf("no token in %q", tokOut)
	}

	// Redis on the site's host and on coord's: TLS, one ACL user per role,
	// the default user off; passwords reach the services in their
	// environment only.
	pass := map[string]string{queue.ACLCoord: "coord-" + randomWord(t), queue.ACLSupervisor: "sup-" + randomWord(t), queue.ACLRunner: "run-" + randomWord(t)}
	redisDirs := map[string]string{}
	startRedis := func(host, cert string, roles ...string) {
		users, err := assembly.RedisUsers("lab", pass, roles...)
		if err != nil {
			t.Fatal(err)
		}
		rdir := filepath.Join(d, "redis-"+host)
		os.MkdirAll(rdir, 0o700)
		redisDirs[host] = rdir
		p, err := redisproc.Start(redisproc.Config{Dir: rdir, Port: 6379, Bind: hn.addrs[host], Persist: true, Users: users,
			TLS:  &redisproc.TLS{Cert: filepath.Join(caDir, cert+".crt"), Key: filepath.Join(caDir, cert+".key"), CA: caFile},
			Wrap: []string{"nsenter", "--net=" + testenv.NetNSPath(hn.hosts[host])},
			Dial: func(addr string) (conn net.Conn, err error) {
				testenv.InNetNS(t, hn.hosts[host], func() error {
					conn, err = net.DialTimeout("tcp", addr, 200*time.Millisecond)
					return nil
				})
				return conn, err
			}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Stop)
	}
	startRedis("site", "redis-lab", queue.ACLSupervisor, queue.ACLRunner)
	startRedis("coord", "redis-coord", queue.ACLCoord)
	pw := func(role string) []string { return []string{"WRIT_REDIS_PASSWORD=" + pass[role]} }

	start("site", "supervisor:lab", pw(queue.ACLSupervisor), append([]string{"supervisor", "--site", "lab", "--listen", siteIP + ":7703",
		"--redis", "rediss://supervisor@" + siteIP + ":6379/0", "--ledger", ledgerURL, "--trust-ttl", "1s"}, crt("supervisor-lab")...)...)
	start("coord", "coord", pw(queue.ACLCoord), append([]string{"coord", "--listen", coordIP + ":7702",
		"--redis", "rediss://coord@" + coordIP + ":6379/0", "--ledger", ledgerURL}, crt("coord")...)...)
	for _, n := range []string{"node1", "node2"} {
		start(n, n, append(pw(queue.ACLRunner), "WRIT_TOKEN="+token), "node", "--ledger", ledgerURL, "--site", "lab",
			"--state-dir", filepath.Join(d, n), "--allow-tmpfs", "--redis", "rediss://runner@"+siteIP+":6379/0",
			"--no-network", "--no-vm", "--concurrency", "2", "--uptime-interval", "2s")
	}
	testenv.WaitFor(t, 60*time.Second, "both nodes online", func() bool {
		out, err := hn.run("admin", caEnv, "node", "ls", "--ledger", ledgerURL)
		return err == nil && strings.Count(out, "online") == 2
	})

	// Alice's job with a secret sealed to the site's nodes.
	const secret = "p4ss-the-s3cret-along"
	script := filepath.Join(d, "secret.tengo")
	os.WriteFile(script, []byte(`job := import("job")
log := import("log")
log.info("got " + job.secrets.token)
job.result({ok: len(job.secrets.token) == 21, echo: job.secrets.token})
`), 0o644)
	secretFile := filepath.Join(d, "secret.txt")
	os.WriteFile(secretFile, []byte(secret), 0o600)
	out, err := hn.run("admin", caEnv, "run", script, "--site", "lab", "--coord", coordURL, "--ledger", ledgerURL, "--key", aliceKey,
		"--secret", "token=@"+secretFile)
	if err != nil || !strings.Contains(out, `"ok": true`) || !strings.Contains(out, "[secret token]") {
		t.Fatalf("alice's job with a secret: %v\n%s", err, out)
	}
	jobID := ""
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "● job ") {
			jobID = strings.Fields(line)[2]
		}
	}
	if jobID == "" {
		t.Fatalf("no job ID in %s", out)
	}

	// From the stranger's host.
	pool, _ := pki.LoadPool(caFile)
	trusting := &tls.Config{RootCAs: pool}
	// Redis without credentials: plain TCP gets no answer; TLS without a
	// login gets NOAUTH; the default user is off.
	if got, _ := hn.raw("stranger", siteIP+":6379", trusting, "PING\r\n"); !strings.Contains(got, "NOAUTH") {
		t.Errorf("PING without credentials over TLS = %q, want NOAUTH", got)
	}
	if got, _ := hn.raw("stranger", siteIP+":6379", trusting, "AUTH default \"\"\r\nGET x\r\n"); strings.Contains(got, "+OK") {
		t.Errorf("the default user logged in: %q", got)
	}
	if got, _ := hn.raw("stranger", siteIP+":6379", trusting, "AUTH runner guess\r\n"); !strings.Contains(got, "WRONGPASS") {
		t.Errorf("a guessed password = %q, want WRONGPASS", got)
	}
	if err := testenv.InNetNS(t, hn.hosts["stranger"], func() error {
		c, err := net.DialTimeout("tcp", siteIP+":6379", 3*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		io.WriteString(c, "PING\r\n")
		b := make([]byte, 64)
		n, _ := c.Read(b)
		if strings.Contains(string(b[:n]), "PONG") {
			return fmt.Errorf("plain TCP PING answered %q", b[:n])
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	// An unsigned read of coord.
	get := "GET /v1/jobs HTTP/1.1\r\nHost: " + coordIP + ":7702\r\nConnection: close\r\n\r\n"
	if got, err := hn.raw("stranger", coordIP+":7702", trusting, get); err != nil || !strings.Contains(got, " 401 ") {
		t.Errorf("unsigned GET /v1/jobs = %q, %v; want 401", firstLine(got), err)
	}
	// A key the ledger does not know, and another user's job.
	if out, err := hn.run("stranger", caEnv, "job", "ls", "--coord", coordURL, "--key", strangerKey); err == nil || !strings.Contains(out, "401") {
		t.Errorf("a stranger's key lists jobs: %v %s", err, out)
	}
	if out, err := hn.run("stranger", caEnv, "job", "get", jobID, "--coord", coordURL, "--key", bobKey); err == nil || !strings.Contains(out, "404") {
		t.Errorf("bob reads alice's job: %v %s", err, out)
	}
	if out, err := hn.run("stranger", caEnv, "job", "get", jobID, "--coord", coordURL, "--key", aliceKey); err != nil || !strings.Contains(out, `"succeeded"`) {
		t.Errorf("alice reads her job: %v %s", err, out)
	}
	// A batch POSTed to the supervisor without coord's certificate: none
	// (401), and one of the CA under another name (403).
	batch := "[]"
	post := "POST /v1/jobs/batch HTTP/1.1\r\nHost: " + siteIP + ":7703\r\nContent-Type: application/json\r\nContent-Length: " + fmt.Sprint(len(batch)) + "\r\nConnection: close\r\n\r\n" + batch
	if got, err := hn.raw("stranger", siteIP+":7703", trusting, post); err != nil || !strings.Contains(got, " 401 ") {
		t.Errorf("a batch without a certificate = %q, %v; want 401", firstLine(got), err)
	}
	outsider, err := tls.LoadX509KeyPair(filepath.Join(caDir, "outsider.crt"), filepath.Join(caDir, "outsider.key"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := hn.raw("stranger", siteIP+":7703", &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{outsider}}, post); err != nil || !strings.Contains(got, " 403 ") {
		t.Errorf("a batch with another service's certificate = %q, %v; want 403", firstLine(got), err)
	}
	if got, err := hn.raw("stranger", siteIP+":7703", trusting, "GET /v1/events?after=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil || !strings.Contains(got, " 401 ") {
		t.Errorf("the site's events without coord's certificate = %q, %v; want 401", firstLine(got), err)
	}
	if got, err := hn.raw("stranger", ledgerIP+":7701", trusting, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil || !strings.Contains(got, " 401 ") {
		t.Errorf("the ledger's metrics without a certificate = %q, %v; want 401", firstLine(got), err)
	}
	// A client trusting another CA refuses every server.
	otherDir := filepath.Join(d, "other-ca")
	f.run("ca", "init", "--dir", otherDir)
	otherPool := x509.NewCertPool()
	otherPEM, _ := os.ReadFile(filepath.Join(otherDir, pki.CACertFile))
	otherPool.AppendCertsFromPEM(otherPEM)
	for _, addr := range []string{ledgerIP + ":7701", coordIP + ":7702", siteIP + ":7703", siteIP + ":6379"} {
		if _, err := hn.raw("stranger", addr, &tls.Config{RootCAs: otherPool}, "PING\r\n"); err == nil || !strings.Contains(err.Error(), "certificate") {
			t.Errorf("a client trusting another CA reached %s: %v", addr, err)
		}
	}
	if out, err := hn.run("stranger", []string{"WRIT_CA=" + filepath.Join(otherDir, pki.CACertFile)}, "site", "ls", "--ledger", ledgerURL); err == nil {
		t.Errorf("writ trusting another CA read the ledger:\n%s", out)
	}

	// The secret is nowhere: not in a Redis file (the append-only logs
	// hold every write), a service log, a process's argv, or coord's
	// records.
	time.Sleep(1500 * time.Millisecond) // appendfsync everysec
	for host, dir := range redisDirs {
		filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
			if err != nil || info.IsDir() {
				return nil
			}
			b, _ := os.ReadFile(p)
			if bytes.Contains(b, []byte(secret)) {
				t.Errorf("the secret is in %s's Redis file %s", host, p)
			}
			for role, pw := range pass {
				if bytes.Contains(b, []byte(pw)) {
					t.Errorf("%s's password is in %s", role, p)
				}
			}
			return nil
		})
	}
	f.mu.Lock()
	procs := make([]*proc, 0, len(f.procs))
	for _, p := range f.procs {
		procs = append(procs, p)
	}
	f.mu.Unlock()
	for _, p := range procs {
		log := p.log.String()
		if strings.Contains(log, secret) {
			t.Errorf("the secret is in %s's log", p.name)
		}
		for role, pw := range pass {
			if strings.Contains(log, pw) {
				t.Errorf("%s's Redis password is in %s's log", role, p.name)
			}
		}
		if strings.Contains(log, token) {
			t.Errorf("the enrollment token is in %s's log", p.name)
		}
		argv, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p.cmd.Process.Pid))
		for _, s := range append([]string{secret, token}, pass[queue.ACLCoord], pass[queue.ACLSupervisor], pass[queue.ACLRunner]) {
			if bytes.Contains(argv, []byte(s)) {
				t.Errorf("a secret is in %s's argv", p.name)
			}
		}
	}
	rec, err := hn.run("admin", caEnv, "job", "get", jobID, "--coord", coordURL, "--key", adminKey)
	if err != nil || strings.Contains(rec, secret) || !strings.Contains(rec, "[secret token]") {
		t.Errorf("coord's record: %v\n%s", err, rec)
	}
	var evs bytes.Buffer
	w := hn.cmd("admin", caEnv, writBin, "job", "watch", jobID, "--coord", coordURL, "--key", adminKey)
	w.Stdout, w.Stderr = &evs, &evs
	w.Run()
	if strings.Contains(evs.String(), secret) || !strings.Contains(evs.String(), "got [secret token]") {
		t.Errorf("the job's events:\n%s", evs.String())
	}
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\r\n")
	return line
}

func randomWord(t *testing.T) string {
	k, err := keys.Generate("x")
	if err != nil {
		t.Fatal(err)
	}
	return strings.NewReplacer("+", "", "/", "", "=", "", ":", "").Replace(k.ID[len(k.ID)-20:])
}

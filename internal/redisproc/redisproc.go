// Package redisproc runs a redis-server child process: `writ dev` uses it
// for its embedded Redis and tests use it through internal/testenv.
//
// It shells out to redis-server because Redis is a separate server program;
// there is no library form of it.
package redisproc

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Config says where and how to run redis-server.
type Config struct {
	// Dir holds the data files (dump.rdb, appendonly). Required.
	Dir string
	// Port to listen on 127.0.0.1. Required.
	Port int
	// Log is the log file; empty means Dir/redis.log.
	Log string
	// Persist turns on append-only persistence (for `writ dev`, so a
	// restarted fleet keeps its jobs); tests leave it off.
	Persist bool
	// Fsync is appendfsync with Persist: everysec (the default) or always.
	Fsync string
	// Bind is the address to listen on; empty means 127.0.0.1.
	Bind string
	// Users are ACL users. When any is given, every client must log in as
	// one of them (the default user needs a password no one is told; see
	// defaultUser).
	Users []User
	// TLS, when set, makes the server speak TLS only (rediss://).
	TLS *TLS
	// Wrap is a command prefix to run redis-server under (nsenter --net,
	// for a host of a multi-host test).
	Wrap []string
	// Dial, when set, opens the TCP connections Start checks the server
	// with (from inside the namespace Wrap enters).
	Dial func(addr string) (net.Conn, error)
	// ReplicaOf, when set (host:port), makes the server a replica of that
	// primary.
	ReplicaOf string
	// Internal is the password of the users Redis's own parts log in as
	// (a replica to its primary, Sentinel to the servers it watches and to
	// the other sentinels: InternalUsers). Required with Users when the
	// server is replicated or watched by Sentinel.
	Internal string
	// Sentinel, when set, runs a sentinel instead of a data server: it
	// watches the primary named there. Users are the clients' users on the
	// sentinel (SentinelRules apply to them, not their data rules).
	Sentinel *Sentinel
}

// Sentinel is what a sentinel watches.
type Sentinel struct {
	Master  string // the name clients ask for (master_name)
	Primary string // host:port of the primary at start
	Quorum  int
	// DownAfter is how long the primary may be silent before it is
	// considered down; zero means 2 s (Redis's default, 30 s, is for
	// networks that drop packets; tests want failovers quickly).
	DownAfter time.Duration
}

// Internal users: replication and Sentinel, each with only the commands
// Redis's documentation lists for it.
const (
	ReplicaUser  = "writ-replica"
	SentinelUser = "writ-sentinel"
	replicaRules = "+psync +replconf +ping"
	// https://redis.io/docs/latest/operate/oss_and_stack/management/sentinel/#redis-access-control-list-authentication
	sentinelDataRules = "allchannels +multi +slaveof +ping +exec +subscribe +config|rewrite +role +publish +info +client|setname +client|kill +script|kill"
	// SentinelRules are a client's rules on a sentinel: find the primary
	// and hear of failovers, nothing that changes what Sentinel watches.
	SentinelRules = "allchannels -@all +ping +auth +hello +client|setname +client|id +subscribe +psubscribe +unsubscribe +punsubscribe +sentinel|get-master-addr-by-name +sentinel|sentinels +sentinel|replicas +sentinel|slaves +sentinel|master"
)

// defaultUser is the configuration line of Redis's default user when
// writ's users are given: off on a sentinel; on a data server, every
// permission behind a password no one is told.
//
// Workaround for redis/redis#14541 (fixed by redis/redis#14545, not in
// Debian 12's Redis 7.0): while loading the append-only file, EXEC checks
// the ACL of the queued commands again, as the default user (the loading
// client's). With the default user off and without permissions, every
// MULTI/EXEC in the file, and every Lua script (propagated as MULTI/EXEC),
// is dropped with a log line: a Redis killed -9 came back without most
// of its writes (found by make chaos; TestKill_KeepsWrites). The default
// user therefore keeps every permission, with a password derived from
// every other user's, which only the holder of all of them could compute
// (and that holder controls the server already). It is deterministic, so
// the same passwords give the same configuration.
func defaultUser(data bool, users []User) string {
	if !data {
		return "user default off resetpass resetkeys -@all"
	}
	mac := hmac.New(sha256.New, []byte("writ redis default user"))
	for _, u := range users {
		mac.Write([]byte(u.Name + "\x00" + u.Password + "\x00"))
	}
	sum := sha256.Sum256([]byte(hex.EncodeToString(mac.Sum(nil))))
	return "user default on resetpass #" + hex.EncodeToString(sum[:]) + " resetkeys resetchannels ~* &* +@all"
}

// User is an ACL user: a name, a password (stored in the configuration
// as its SHA-256 only) and rules: key patterns (~writ:coord:*), channels
// (&asynq:cancel) and commands (+@all -@dangerous).
type User struct {
	Name, Password, Rules string
}

// TLS are the server's certificate, key and the CA it trusts.
type TLS struct {
	Cert, Key, CA string
}

// Process is a running redis-server.
type Process struct {
	cmd  *exec.Cmd
	host string
	port int
	tls  *tls.Config // nil: plain
	dial func(addr string) (net.Conn, error)
	done chan struct{}
}

// Conf returns the configuration lines of cfg (Dir and Log may be empty:
// redis-server's own defaults then apply).
func Conf(cfg Config) ([]string, error) {
	if cfg.Bind == "" {
		cfg.Bind = "127.0.0.1"
	}
	conf := []string{"bind " + cfg.Bind, "daemonize no", "protected-mode yes", `save ""`}
	if cfg.Dir != "" {
		conf = append(conf, "dir "+quote(cfg.Dir))
	}
	if cfg.Log != "" {
		conf = append(conf, "logfile "+quote(cfg.Log))
	}
	if cfg.TLS != nil {
		conf = append(conf, "port 0", "tls-port "+strconv.Itoa(cfg.Port),
			"tls-cert-file "+quote(cfg.TLS.Cert), "tls-key-file "+quote(cfg.TLS.Key), "tls-ca-cert-file "+quote(cfg.TLS.CA),
			// Clients prove themselves with ACL passwords, not certificates.
			"tls-auth-clients no")
	} else {
		conf = append(conf, "port "+strconv.Itoa(cfg.Port))
	}
	if cfg.Sentinel == nil {
		if cfg.Persist {
			fsync := cfg.Fsync
			if fsync == "" {
				fsync = "everysec"
			}
			conf = append(conf, "appendonly yes", "appendfsync "+fsync)
		} else {
			conf = append(conf, "appendonly no")
		}
	}
	if strings.ContainsAny(cfg.Internal, "\n\r \"") {
		return nil, errors.New("redis internal password: no spaces, quotes or line breaks")
	}
	users := cfg.Users
	if cfg.Sentinel != nil {
		users = nil
		for _, u := range cfg.Users {
			users = append(users, User{Name: u.Name, Password: u.Password, Rules: SentinelRules})
		}
	}
	if len(users) > 0 && cfg.Internal != "" {
		if cfg.Sentinel != nil {
			users = append(users, User{Name: SentinelUser, Password: cfg.Internal, Rules: "allchannels +@all"})
		} else {
			users = append(users, User{Name: ReplicaUser, Password: cfg.Internal, Rules: replicaRules},
				User{Name: SentinelUser, Password: cfg.Internal, Rules: sentinelDataRules})
		}
	}
	if len(users) > 0 {
		conf = append(conf, defaultUser(cfg.Sentinel == nil, users))
		for _, u := range users {
			if strings.ContainsAny(u.Name+u.Rules, "\n\r") || u.Name == "" || u.Password == "" {
				return nil, fmt.Errorf("redis user %q: a name, a password and rules on one line", u.Name)
			}
			sum := sha256.Sum256([]byte(u.Password))
			conf = append(conf, fmt.Sprintf("user %s on resetpass #%s resetkeys resetchannels %s", u.Name, hex.EncodeToString(sum[:]), u.Rules))
		}
	}
	if cfg.ReplicaOf != "" {
		host, port, err := net.SplitHostPort(cfg.ReplicaOf)
		if err != nil {
			return nil, fmt.Errorf("replicaof %q: %w", cfg.ReplicaOf, err)
		}
		conf = append(conf, "replicaof "+host+" "+port)
	}
	if cfg.Internal != "" && cfg.Sentinel == nil {
		// A replica logs in to its primary; so does a primary demoted
		// after a failover.
		conf = append(conf, "masteruser "+ReplicaUser, "masterauth "+quote(cfg.Internal))
		if cfg.TLS != nil {
			conf = append(conf, "tls-replication yes")
		}
	}
	if sc := cfg.Sentinel; sc != nil {
		host, port, err := net.SplitHostPort(sc.Primary)
		if err != nil || strings.ContainsAny(sc.Master, " \n\r\"") || sc.Master == "" {
			return nil, fmt.Errorf("sentinel of %q at %q: a name without spaces and a host:port", sc.Master, sc.Primary)
		}
		down := sc.DownAfter
		if down == 0 {
			down = 2 * time.Second
		}
		conf = append(conf,
			fmt.Sprintf("sentinel monitor %s %s %s %d", sc.Master, host, port, max(sc.Quorum, 1)),
			fmt.Sprintf("sentinel down-after-milliseconds %s %d", sc.Master, down.Milliseconds()),
			fmt.Sprintf("sentinel failover-timeout %s %d", sc.Master, (10*down).Milliseconds()),
			"sentinel resolve-hostnames yes")
		if cfg.Internal != "" {
			conf = append(conf,
				fmt.Sprintf("sentinel auth-user %s %s", sc.Master, SentinelUser),
				fmt.Sprintf("sentinel auth-pass %s %s", sc.Master, cfg.Internal),
				"sentinel sentinel-user "+SentinelUser, "sentinel sentinel-pass "+cfg.Internal)
		}
		if cfg.TLS != nil {
			conf = append(conf, "tls-replication yes") // to the servers it watches
		}
	}
	return conf, nil
}

// Start launches redis-server and waits until it answers PING (up to 10 s).
func Start(cfg Config) (*Process, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, errors.New("redis-server not found on PATH: install it (apt-get install redis-server) or pass --redis URL")
	}
	if cfg.Log == "" {
		cfg.Log = cfg.Dir + "/redis.log"
	}
	if cfg.Bind == "" {
		cfg.Bind = "127.0.0.1"
	}
	// Everything goes in a configuration file (mode 0600): passwords
	// (hashed) and paths never appear in the process list.
	conf, err := Conf(cfg)
	if err != nil {
		return nil, err
	}
	confPath := filepath.Join(cfg.Dir, "redis.conf")
	if err := os.WriteFile(confPath, []byte(strings.Join(conf, "\n")+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("redis configuration: %w", err)
	}
	args := append(append([]string(nil), cfg.Wrap...), bin, confPath)
	if cfg.Sentinel != nil {
		// Sentinel rewrites its configuration file as it learns the
		// fleet; it stays 0600 in Dir.
		args = append(args, "--sentinel")
	}
	cmd := exec.Command(args[0], args[1:]...)
	// Die with the parent: a crashed `writ dev` or test binary must not
	// leave a redis-server behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start redis-server: %w", err)
	}
	p := &Process{cmd: cmd, port: cfg.Port, host: cfg.Bind, dial: cfg.Dial, done: make(chan struct{})}
	if cfg.TLS != nil {
		pem, err := os.ReadFile(cfg.TLS.CA)
		if err != nil {
			cmd.Process.Kill()
			return nil, err
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		p.tls = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12, ServerName: cfg.Bind}
	}
	go func() { cmd.Wait(); close(p.done) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if p.ping() == nil {
			return p, nil
		}
		select {
		case <-p.done:
			log, _ := os.ReadFile(cfg.Log)
			return nil, fmt.Errorf("redis-server exited at start: %s", tail(string(log), 400))
		default:
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, errors.New("redis-server did not answer within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// ping reports whether the server answers PING (NOAUTH counts: it is up,
// and wants a login).
func (p *Process) ping() error {
	var conn net.Conn
	var err error
	if p.dial != nil {
		conn, err = p.dial(p.Addr())
	} else {
		conn, err = net.DialTimeout("tcp", p.Addr(), 200*time.Millisecond)
	}
	if err != nil {
		return err
	}
	if p.tls != nil {
		tc := tls.Client(conn, p.tls)
		tc.SetDeadline(time.Now().Add(time.Second))
		if err := tc.Handshake(); err != nil {
			conn.Close()
			return err
		}
		conn = tc
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	buf := make([]byte, 7)
	n, err := conn.Read(buf)
	if err != nil {
		return err
	}
	if r := string(buf[:n]); r != "+PONG\r\n" && !strings.HasPrefix(r, "-NOAUTH") {
		return fmt.Errorf("unexpected reply %q", buf[:n])
	}
	return nil
}

// Addr returns host:port.
func (p *Process) Addr() string { return net.JoinHostPort(p.host, strconv.Itoa(p.port)) }

// URL returns the redis:// (or, with TLS, rediss://) URL of the server.
func (p *Process) URL() string {
	if p.tls != nil {
		return "rediss://" + p.Addr() + "/0"
	}
	return "redis://" + p.Addr() + "/0"
}

// UserURL returns the URL a client logging in as user dials (the password
// goes separately).
func (p *Process) UserURL(user string) string {
	scheme := "redis://"
	if p.tls != nil {
		scheme = "rediss://"
	}
	return scheme + user + "@" + p.Addr() + "/0"
}

func quote(s string) string { return strconv.Quote(s) }

// Stop terminates the server (SIGTERM, then SIGKILL after 5 s) and waits.
func (p *Process) Stop() {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// Kill kills the server with SIGKILL (no save, no goodbye) and waits.
func (p *Process) Kill() {
	p.cmd.Process.Kill()
	<-p.done
}

// Wait blocks until the server exits or ctx ends.
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return errors.New("redis-server exited")
	case <-ctx.Done():
		return nil
	}
}

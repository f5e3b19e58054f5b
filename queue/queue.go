// Package queue is writ's only Redis and asynq code: the job task
// (TaskType) and its queues (SiteQueue, NodeQueue), the enqueuing client
// supervisors use, the worker server a site's dispatcher (or a runner
// with a Redis credential) takes work from, exactly one end per job (the
// end marker and the acknowledgement), cancellation, each site's event
// stream and the flows it keeps once, the replay guard, the ACL rules of
// each role, Sentinel, and coord's records: jobs, pending deliveries,
// flows, leases and the notices coords send each other.
//
// Redis is not a trust boundary: a task carries the signed envelope bytes,
// and the runner verifies them again before running anything.
package queue

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
)

// TaskType is the asynq task type of a writ job.
const TaskType = "writ:job"

// SiteQueue returns the queue every runner of site listens on.
func SiteQueue(site string) string { return "site:" + site }

// NodeQueue returns the queue only node's runner listens on.
func NodeQueue(node string) string { return "node:" + node }

// Redis is a connection to one Redis deployment.
type Redis struct {
	rdb redis.UniversalClient
	url string
	// replicas is how many replicas must have a write that accepts work
	// before it counts (WAIT): a failover to a replica then loses none.
	replicas int

	once   sync.Once
	client *asynq.Client // made on first use by asynqClient
}

// Connect parses a redis:// URL (redis://[:password@]host:port[/db]) and
// connects. It does not wait for the server; see Ping.
func Connect(url string) (*Redis, error) { return Dial(url, Credentials{}) }

// Credentials are how a client proves itself to Redis and checks the
// server: an ACL password (kept out of the URL, so out of argv and logs)
// and, for rediss:// URLs, the TLS configuration (the site CA).
type Credentials struct {
	Password string
	TLS      *tls.Config
	// Dialer, when set, opens the TCP connections (to the servers and the
	// sentinels); nil is go-redis's own. Tests use it to reach a Redis
	// inside another network namespace.
	Dialer func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Dial connects to the Redis of url (redis:// or rediss://, with an ACL
// user name in it: rediss://runner@host:6379/0) with creds. It does not
// wait for the server; see Ping.
func Dial(url string, creds Credentials) (*Redis, error) {
	if strings.HasPrefix(url, "redis+sentinel://") || strings.HasPrefix(url, "rediss+sentinel://") {
		return dialSentinel(url, creds)
	}
	opt, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("redis url %q: %w", redact(url), err)
	}
	if creds.Password != "" {
		opt.Password = creds.Password
	}
	if opt.TLSConfig != nil {
		if creds.TLS == nil {
			return nil, fmt.Errorf("redis url %s is rediss:// but no CA is given to verify the server (--ca)", redact(url))
		}
		t := creds.TLS.Clone()
		t.ServerName = opt.TLSConfig.ServerName
		opt.TLSConfig = t
	}
	opt.Dialer = creds.Dialer
	tune(&opt.PoolSize, &opt.Protocol)
	return &Redis{rdb: redis.NewClient(opt), url: url}, nil
}

// tune sets the pool size and protocol every writ client uses.
func tune(poolSize, protocol *int) {
	// Pool big enough for the workers and concurrent enqueues of a runner
	// or supervisor on a small machine; go-redis's default is 10 per CPU.
	if *poolSize < 64 {
		*poolSize = 64
	}
	// RESP2: writ uses no RESP3 feature, and go-redis peeks for RESP3 push
	// notifications on every reply, which cost 7% of the fleet's CPU in
	// the end-to-end benchmark.
	if *protocol == 0 {
		*protocol = 2
	}
}

// dialSentinel connects through Redis Sentinel:
//
//	redis+sentinel://USER@SENTINEL:26379/DB?master_name=NAME&addr=SENTINEL2:26379&addr=SENTINEL3:26379
//
// (rediss+sentinel:// for TLS to the sentinels and the servers). The
// client asks the sentinels for the primary of NAME and follows failovers
// (go-redis's failover client, which asynq uses through the same
// *redis.Client). USER and the password log in to the sentinels and to
// the servers alike.
func dialSentinel(raw string, creds Credentials) (*Redis, error) {
	tlsOn := strings.HasPrefix(raw, "rediss+")
	u, err := url.Parse(strings.Replace(raw, "+sentinel", "", 1))
	if err != nil {
		return nil, fmt.Errorf("redis url %q: %w", redact(raw), err)
	}
	// wait_replicas is writ's: how many replicas must hold a write that
	// accepts work (default 1).
	replicas := 1
	q := u.Query()
	if v := q.Get("wait_replicas"); v != "" {
		if replicas, err = strconv.Atoi(v); err != nil || replicas < 0 || replicas > 16 {
			return nil, fmt.Errorf("redis url %s: wait_replicas=%q is not 0 to 16", redact(raw), v)
		}
	}
	q.Del("wait_replicas")
	u.RawQuery = q.Encode()
	opt, err := redis.ParseFailoverURL(u.String())
	if err != nil {
		return nil, fmt.Errorf("redis url %q: %w", redact(raw), err)
	}
	if opt.MasterName == "" {
		return nil, fmt.Errorf("redis url %s names no master (?master_name=NAME)", redact(raw))
	}
	if opt.SentinelPassword != "" {
		return nil, fmt.Errorf("redis url %s holds a password: give it in a file (--redis-password-file)", redact(raw))
	}
	opt.Username = opt.SentinelUsername
	opt.Password, opt.SentinelPassword = creds.Password, creds.Password
	if tlsOn {
		if creds.TLS == nil {
			return nil, fmt.Errorf("redis url %s is rediss+sentinel:// but no CA is given to verify the servers (--ca)", redact(raw))
		}
		// Servers are verified against the CA by the address Sentinel
		// gives (their certificates name their IP addresses).
		opt.TLSConfig = creds.TLS.Clone()
		opt.TLSConfig.ServerName = ""
	}
	opt.Dialer = creds.Dialer
	tune(&opt.PoolSize, &opt.Protocol)
	return &Redis{rdb: redis.NewFailoverClient(opt), url: raw, replicas: replicas}, nil
}

// replicaWait bounds how long a write waits for its replicas.
const replicaWait = 2 * time.Second

// ErrNotReplicated: a write that accepts work reached fewer replicas than
// wait_replicas asks for in time; it may be lost in a failover, so the
// work is not accepted (the caller's client retries; writes are
// idempotent).
var ErrNotReplicated = errors.New("redis: the write did not reach its replicas in time")

// waitReplicas appends WAIT to pipe when writes must reach replicas. WAIT
// covers the writes this connection made, and each of those came after
// every write the caller finished before (on any connection), so at the
// end of a pipeline that writes it covers them all. It returns nil when
// no replica is needed.
func (r *Redis) waitReplicas(ctx context.Context, pipe redis.Pipeliner) *redis.IntCmd {
	if r.replicas == 0 {
		return nil
	}
	c := redis.NewIntCmd(ctx, "wait", r.replicas, replicaWait.Milliseconds())
	pipe.Process(ctx, c)
	return c
}

// replicated checks what waitReplicas appended.
func (r *Redis) replicated(c *redis.IntCmd) error {
	if c == nil {
		return nil
	}
	if n, err := c.Result(); err != nil || n < int64(r.replicas) {
		if err != nil {
			return fmt.Errorf("%w: %v", ErrNotReplicated, err)
		}
		return fmt.Errorf("%w (%d of %d)", ErrNotReplicated, n, r.replicas)
	}
	return nil
}

// Ping checks Redis answers.
func (r *Redis) Ping(ctx context.Context) error {
	if err := r.rdb.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("redis %s: %w", redact(r.url), err)
	}
	return nil
}

// WaitReady pings until Redis answers or ctx ends.
func (r *Redis) WaitReady(ctx context.Context) error {
	for {
		err := r.Ping(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Close closes the connection pool.
func (r *Redis) Close() error { return r.rdb.Close() }

// URL returns the URL this connection was made from, password redacted.
func (r *Redis) URL() string { return redact(r.url) }

// Redact returns a Redis URL with its password replaced by ***.
func Redact(url string) string { return redact(url) }

func redact(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		// Unparsable: hide whatever sits before an @.
		if i := strings.LastIndex(raw, "@"); i > 0 {
			if j := strings.Index(raw, "://"); j > 0 && j < i {
				return raw[:j+3] + "***" + raw[i:]
			}
		}
		return raw
	}
	if _, ok := u.User.Password(); ok {
		u.User = url.UserPassword(u.User.Username(), "***")
		return strings.Replace(u.String(), "%2A%2A%2A", "***", 1)
	}
	return raw
}

// HasPassword reports whether a Redis URL holds a password.
func HasPassword(raw string) bool {
	u, err := url.Parse(raw)
	if err != nil {
		return strings.Contains(raw, "@")
	}
	_, ok := u.User.Password()
	return ok
}

// QueueDepth returns the pending task count of each named queue (0 for a
// queue that does not exist yet).
func (r *Redis) QueueDepth(queues ...string) (map[string]int, error) {
	insp := asynq.NewInspectorFromRedisClient(r.rdb)
	out := make(map[string]int, len(queues))
	for _, q := range queues {
		info, err := insp.GetQueueInfo(q)
		if err != nil {
			if strings.Contains(err.Error(), "not found") {
				out[q] = 0
				continue
			}
			return nil, err
		}
		out[q] = info.Pending + info.Retry + info.Scheduled
	}
	return out, nil
}

// TaskState is asynq's state of task id on queue q: pending, scheduled,
// active, retry, archived or completed.
func (r *Redis) TaskState(q, id string) (string, error) {
	info, err := asynq.NewInspectorFromRedisClient(r.rdb).GetTaskInfo(q, id)
	if err != nil {
		return "", err
	}
	return info.State.String(), nil
}

// InfoInt reads one integer field of a Redis INFO section (benchmarks:
// total_commands_processed, connected_clients).
func (r *Redis) InfoInt(ctx context.Context, section, field string) (int64, error) {
	s, err := r.rdb.Info(ctx, section).Result()
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(s, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), field+":"); ok {
			return strconv.ParseInt(v, 10, 64)
		}
	}
	return 0, fmt.Errorf("no %s in INFO %s", field, section)
}

// dispatchPause records one dispatcher's count of connected nodes, drops
// the entries of dispatchers that stopped renewing theirs, and pauses the
// site queue (asynq's own paused key, set as its Inspector does) exactly
// when no live dispatcher has a node, all in one step: two dispatchers of
// a site cannot undo each other's decision, whatever order their calls
// come in.
//
// KEYS[1] the site's dispatcher hash (ID → "expiry-ms:nodes"), KEYS[2]
// the queue's paused key; ARGV: the dispatcher's ID, its TTL in ms, its
// node count. Server time (TIME), so the dispatchers' clocks do not
// matter. Returns 1 if the queue is paused now, else 0.
var dispatchPause = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], (now + tonumber(ARGV[2])) .. ':' .. ARGV[3])
local live = false
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local exp, n = string.match(all[i + 1], '^(%d+):(%d+)$')
  if exp == nil or tonumber(exp) < now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif tonumber(n) > 0 then
    live = true
  end
end
if live then
  redis.call('DEL', KEYS[2])
  return 0
end
redis.call('SET', KEYS[2], t[1])
return 1
`)

// SetDispatching says that dispatcher id of site has nodes connected now,
// and is alive for ttl (call it again within ttl, and at every change).
// The site queue is paused while no live dispatcher of the site has a
// node: a dispatcher with no node to send work to leaves it in the queue,
// where it waits (and another dispatcher's nodes take it), rather than
// holding it until its deadline. It returns whether the queue is paused.
func (r *Redis) SetDispatching(site, id string, nodes int, ttl time.Duration) (paused bool, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := dispatchPause.Run(ctx, r.rdb, []string{dispatchersKey(site), "asynq:{" + SiteQueue(site) + "}:paused"},
		id, ttl.Milliseconds(), nodes).Int()
	if err != nil {
		return false, fmt.Errorf("queue: dispatchers of site %s: %w", site, err)
	}
	return n == 1, nil
}

// dispatchersKey holds a site's dispatchers and their node counts.
func dispatchersKey(site string) string { return "writ:site:" + site + ":dispatchers" }

// Paused reports whether queue q is paused.
func (r *Redis) Paused(q string) (bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := r.rdb.Exists(ctx, "asynq:{"+q+"}:paused").Result()
	return n == 1, err
}

package redisproc

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"
)

// TestKill_KeepsWrites: with Persist, Fsync always and ACL users, every
// write a client saw answered (plain, in MULTI/EXEC, or by a Lua script)
// survives kill -9 of the server, restart after restart. Without
// defaultUser's workaround for redis/redis#14541 the transactions and
// scripts are dropped when the append-only file is loaded.
func TestKill_KeepsWrites(t *testing.T) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server not installed")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	cfg := Config{Dir: t.TempDir(), Port: port, Persist: true, Fsync: "always",
		Users: []User{{Name: "app", Password: "app-password", Rules: "~app:* +@all -@dangerous"}}}
	ctx := context.Background()
	const rounds = 3
	for round := 0; round < rounds; round++ {
		p, err := Start(cfg)
		if err != nil {
			t.Fatal(err)
		}
		rdb := redis.NewClient(&redis.Options{Addr: p.Addr(), Username: "app", Password: "app-password"})
		if n, err := rdb.DBSize(ctx).Result(); err != nil || n != int64(5*round) {
			t.Errorf("round %d: %d keys (%v), want %d", round, n, err, 5*round)
		}
		if err := rdb.Set(ctx, fmt.Sprintf("app:plain%d", round), "v", 0).Err(); err != nil {
			t.Fatal(err)
		}
		if _, err := rdb.TxPipelined(ctx, func(pipe redis.Pipeliner) error {
			// Two writes: Redis propagates a transaction of one as is.
			pipe.Set(ctx, fmt.Sprintf("app:multi%d", round), "v", 0)
			pipe.Set(ctx, fmt.Sprintf("app:multi%d-2", round), "v", 0)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if err := rdb.Eval(ctx, "redis.call('SET', KEYS[1], 'v'); return redis.call('SET', KEYS[2], 'v')", []string{fmt.Sprintf("app:script%d", round), fmt.Sprintf("app:script%d-2", round)}).Err(); err != nil {
			t.Fatal(err)
		}
		rdb.Close()
		p.Kill()
	}
	// No one logs in as the default user.
	conf, err := Conf(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if line := conf[indexOf(conf, "user default")]; !strings.Contains(line, " #") || strings.Contains(line, "nopass") {
		t.Errorf("default user: %s", line)
	}
}

func indexOf(lines []string, prefix string) int {
	for i, l := range lines {
		if strings.HasPrefix(l, prefix) {
			return i
		}
	}
	return 0
}

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/flow"
	"github.com/writ-fleet/writ/keys"
)

// flowRedisBench measures what a fan-out of n items over a flow of about
// kib KiB costs Redis: used_memory once the flow ended against before it
// was submitted (writ dev keeps coord's and the site's keys in one Redis;
// asynq deletes a task once done, so what stays is coord's records, the
// events and the kept flow).
func flowRedisBench(cl *coord.Client, k *keys.Key, addr string, n, kib int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	defer rdb.Close()
	used := func() (int64, error) {
		info, err := rdb.Info(ctx, "memory").Result()
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(info, "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "used_memory:"); ok {
				return strconv.ParseInt(v, 10, 64)
			}
		}
		return 0, fmt.Errorf("no used_memory in INFO")
	}
	items := make([]int, n)
	for i := range items {
		items[i] = i
	}
	list, _ := json.Marshal(items)
	fl := envelope.NewFlow("bench-redis", "local", time.Now())
	fl.Args, _ = json.Marshal(map[string]string{"pad": strings.Repeat("x", kib<<10)})
	fl.Steps = []envelope.Step{{Name: "each", Script: benchScript, ForEach: list}}
	env, err := fl.Sign(k)
	if err != nil {
		return err
	}
	raw, _ := json.Marshal(env)
	before, err := used()
	if err != nil {
		return err
	}
	rep, err := cl.SubmitFlow(ctx, raw)
	if err != nil {
		return err
	}
	for {
		f, err := cl.Flow(ctx, rep.ID)
		if err != nil {
			return err
		}
		if f.State == flow.StateSucceeded {
			break
		}
		if f.State == flow.StateFailed || f.State == flow.StateCancelled {
			return fmt.Errorf("flow %s %s: %s", rep.ID, f.State, f.Error)
		}
		time.Sleep(100 * time.Millisecond)
	}
	after, err := used()
	if err != nil {
		return err
	}
	d := float64(after - before)
	fmt.Printf("flow redis: a %d KiB flow fanned out over %d items: Redis holds %.1f MiB more once it ended (%.1f KiB an item)\n",
		len(raw)>>10, n, d/(1<<20), d/1024/float64(n))
	return nil
}

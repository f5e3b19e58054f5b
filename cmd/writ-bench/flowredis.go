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
// kib KiB costs Redis: used_memory at its highest while the flow runs
// (sampled every 10 ms) and once it ended, against before it was
// submitted. Each item sleeps 1 s, so most of the fan-out waits queued,
// as on a busy site (writ dev keeps coord's and the site's keys in one Redis;
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
	fl.Steps = []envelope.Step{{Name: "each", Script: `times := import("times"); times.sleep(times.second)`, ForEach: list}}
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
	peak := before
	sampled := make(chan struct{})
	stop := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if m, err := used(); err == nil && m > peak {
				peak = m
			}
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	for {
		f, err := cl.Flow(ctx, rep.ID)
		if err != nil {
			close(stop)
			return err
		}
		if f.State == flow.StateSucceeded {
			break
		}
		if f.State == flow.StateFailed || f.State == flow.StateCancelled {
			close(stop)
			return fmt.Errorf("flow %s %s: %s", rep.ID, f.State, f.Error)
		}
		time.Sleep(100 * time.Millisecond)
	}
	close(stop)
	<-sampled
	after, err := used()
	if err != nil {
		return err
	}
	mib := func(b int64) float64 { return float64(b) / (1 << 20) }
	fmt.Printf("flow redis: a %d KiB flow fanned out over %d items: Redis held at most %.1f MiB more while it ran, %.1f MiB once it ended\n",
		len(raw)>>10, n, mib(peak-before), mib(after-before))
	return nil
}

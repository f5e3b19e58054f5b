package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/flow"
	"github.com/writ-fleet/writ/keys"
)

// flowBench measures what a flow adds per step: a chain of n steps against
// n single jobs run one after another, and a fan-out of n items against n
// single jobs run at once; every step and job the same no-op script.
func flowBench(cl *coord.Client, k *keys.Key, n int) error {
	chain := envelope.NewFlow("bench-chain", "local", time.Now())
	for i := range n {
		s := envelope.Step{Name: fmt.Sprintf("s%d", i), Script: benchScript}
		if i > 0 {
			s.DependsOn = []string{fmt.Sprintf("s%d", i-1)}
		}
		chain.Steps = append(chain.Steps, s)
	}
	chainTime, err := runFlow(cl, k, chain)
	if err != nil {
		return fmt.Errorf("chain: %w", err)
	}
	raws, err := signAll(k, n)
	if err != nil {
		return err
	}
	start := time.Now()
	for _, raw := range raws {
		if _, err := oneJob(cl, raw); err != nil {
			return err
		}
	}
	seqTime := time.Since(start)

	items := make([]int, n)
	for i := range items {
		items[i] = i
	}
	list, _ := json.Marshal(items)
	fan := envelope.NewFlow("bench-fan", "local", time.Now())
	fan.Steps = []envelope.Step{{Name: "each", Script: benchScript, ForEach: list}}
	fanTime, err := runFlow(cl, k, fan)
	if err != nil {
		return fmt.Errorf("fan-out: %w", err)
	}
	if raws, err = signAll(k, n); err != nil {
		return err
	}
	start = time.Now()
	if _, err := runAll(cl, raws, n); err != nil {
		return err
	}
	allTime := time.Since(start)

	per := func(d time.Duration) string { return (d / time.Duration(n)).Round(100 * time.Microsecond).String() }
	fmt.Printf("flow chain of %d steps:   %8s (%s a step)   %d single jobs one after another: %8s (%s a job)   overhead a step: %s\n",
		n, chainTime.Round(time.Millisecond), per(chainTime), n, seqTime.Round(time.Millisecond), per(seqTime), per(chainTime-seqTime))
	fmt.Printf("flow fan-out of %d items: %8s (%s an item)   %d single jobs at once:          %8s (%s a job)   overhead an item: %s\n",
		n, fanTime.Round(time.Millisecond), per(fanTime), n, allTime.Round(time.Millisecond), per(allTime), per(fanTime-allTime))
	return nil
}

// runFlow submits fl and waits for it to succeed; it returns the time from
// submission to the end coord reports.
func runFlow(cl *coord.Client, k *keys.Key, fl *envelope.Flow) (time.Duration, error) {
	env, err := fl.Sign(k)
	if err != nil {
		return 0, err
	}
	raw, _ := json.Marshal(env)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	rep, err := cl.SubmitFlow(ctx, raw)
	if err != nil {
		return 0, err
	}
	for {
		f, err := cl.Flow(ctx, rep.ID)
		if err != nil {
			return 0, err
		}
		switch f.State {
		case flow.StateSucceeded:
			return time.Since(start), nil
		case flow.StateFailed, flow.StateCancelled:
			b, _ := json.Marshal(f.Run)
			return 0, fmt.Errorf("flow %s %s: %s", rep.ID, f.State, strings.TrimSpace(string(b[:min(len(b), 2000)])))
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func envOrDefault(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

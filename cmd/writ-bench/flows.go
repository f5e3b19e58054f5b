package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/writ-fleet/writ/coord"
	"github.com/writ-fleet/writ/envelope"
	"github.com/writ-fleet/writ/flow"
	"github.com/writ-fleet/writ/keys"
)

// flowBench measures what a flow adds per step: a chain of n steps against
// n single jobs run one after another, and a fan-out of n items against n
// single jobs run at once; every step and job the same no-op script. Each
// is run runs times, alternating, and the median is compared.
func flowBench(cl *coord.Client, k *keys.Key, n, runs int) error {
	chain := envelope.NewFlow("bench-chain", "local", time.Now())
	for i := range n {
		s := envelope.Step{Name: fmt.Sprintf("s%d", i), Script: benchScript}
		if i > 0 {
			s.DependsOn = []string{fmt.Sprintf("s%d", i-1)}
		}
		chain.Steps = append(chain.Steps, s)
	}
	items := make([]int, n)
	for i := range items {
		items[i] = i
	}
	list, _ := json.Marshal(items)
	var chainT, seqT, fanT, allT []time.Duration
	for run := range runs {
		chain.Args = json.RawMessage(fmt.Sprintf(`{"run":%d}`, run)) // another flow each run
		d, err := runFlow(cl, k, chain)
		if err != nil {
			return fmt.Errorf("chain: %w", err)
		}
		chainT = append(chainT, d)
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
		seqT = append(seqT, time.Since(start))

		fan := envelope.NewFlow("bench-fan", "local", time.Now())
		fan.Steps = []envelope.Step{{Name: "each", Script: benchScript, ForEach: list}}
		if d, err = runFlow(cl, k, fan); err != nil {
			return fmt.Errorf("fan-out: %w", err)
		}
		fanT = append(fanT, d)
		if raws, err = signAll(k, n); err != nil {
			return err
		}
		start = time.Now()
		if _, err := runAll(cl, raws, n); err != nil {
			return err
		}
		allT = append(allT, time.Since(start))
	}
	per := func(d time.Duration) string { return (d / time.Duration(n)).Round(100 * time.Microsecond).String() }
	spread := func(ds []time.Duration) string {
		s := slices.Clone(ds)
		slices.Sort(s)
		return fmt.Sprintf("%s (%s-%s)", s[len(s)/2].Round(time.Millisecond), s[0].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond))
	}
	median := func(ds []time.Duration) time.Duration {
		s := slices.Clone(ds)
		slices.Sort(s)
		return s[len(s)/2]
	}
	fmt.Printf("flow chain of %d steps, median of %d (range): %s, %s a step; %d single jobs one after another: %s, %s a job; overhead a step: %s\n",
		n, runs, spread(chainT), per(median(chainT)), n, spread(seqT), per(median(seqT)), per(median(chainT)-median(seqT)))
	fmt.Printf("flow fan-out of %d items, median of %d (range): %s, %s an item; %d single jobs at once: %s, %s a job; overhead an item: %s\n",
		n, runs, spread(fanT), per(median(fanT)), n, spread(allT), per(median(allT)), per(median(fanT)-median(allT)))
	return nil
}

// runFlow submits fl and follows its event stream until it ends; it
// returns the time from submission to the end coord reports.
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
	var end *coord.FlowEvent
	var took time.Duration
	err = cl.WatchFlow(ctx, rep.ID, func(ev coord.FlowStreamEvent) bool {
		if ev.Flow != nil && flow.Ended(ev.Flow.State) {
			end, took = ev.Flow, time.Since(start)
		}
		return true
	})
	switch {
	case err != nil:
		return 0, err
	case end == nil:
		return 0, fmt.Errorf("flow %s: the stream ended before the flow", rep.ID)
	case end.State != flow.StateSucceeded:
		f, _ := cl.Flow(ctx, rep.ID)
		b, _ := json.Marshal(f.Run)
		return 0, fmt.Errorf("flow %s %s: %s", rep.ID, end.State, strings.TrimSpace(string(b[:min(len(b), 2000)])))
	}
	return took, nil
}

func envOrDefault(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

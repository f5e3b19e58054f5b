package queue

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// A flow's record in coord's Redis: the envelope as signed, who signed it,
// and its progress (flow.Run as JSON) with a version that every update
// compares, so two coords (each following one of the sites a flow spans)
// never overwrite each other's step ends. Each step job's ID points back
// at its flow, so a job's end finds the flow it advances.
const (
	flowsIndex  = "writ:coord:flows"
	flowsActive = "writ:coord:flows:active" // flows that have not ended: what the sweep reads
)

func flowKey(id string) string        { return "writ:coord:flow:" + id }
func flowStepKey(jobID string) string { return "writ:coord:flowstep:" + jobID }
func userFlowsKey(u string) string    { return "writ:coord:user:" + u + ":flows" }

// ErrFlowConflict: the flow changed since it was read; read it again.
var ErrFlowConflict = errors.New("flow changed since it was read")

// ErrNoFlow: coord has no record of the flow.
var ErrNoFlow = errors.New("no such flow")

// FlowRecord is a flow as coord keeps it.
type FlowRecord struct {
	ID        string
	Name      string
	Envelope  []byte // the flow's DSSE envelope, as signed
	Users     []string
	Submitted time.Time
	// Run is the progress (flow.Run as JSON); Version counts its updates.
	Run     []byte
	Version int64
}

// StepRef is what a step job's ID points at.
type StepRef struct {
	Flow    string `json:"flow"`
	Step    string `json:"step"`
	Item    int    `json:"item"`
	Attempt int    `json:"attempt"`
}

// createFlow writes a flow record unless one exists; it returns 1 if it
// wrote it. KEYS: the record, the index, then each user's index; ARGV:
// retention (ms), the submit time (ms), the ID, then field/value pairs
// (the count of them first).
var createFlow = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[4])
for i = 5, 4 + 2 * n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
for i = 2, #KEYS do redis.call('ZADD', KEYS[i], ARGV[2], ARGV[3]) end
return 1
`)

// DropActiveFlow takes a flow whose record is gone (its retention passed)
// out of the active index.
func (r *Redis) DropActiveFlow(ctx context.Context, id string) error {
	return r.rdb.ZRem(ctx, flowsActive, id).Err()
}

// ActiveFlows returns up to limit flows that have not ended, oldest first.
func (r *Redis) ActiveFlows(ctx context.Context, limit int64) ([]string, error) {
	ids, err := r.rdb.ZRange(ctx, flowsActive, 0, limit-1).Result()
	if err != nil {
		return nil, fmt.Errorf("queue: active flows: %w", err)
	}
	return ids, nil
}

// CreateFlow records a new flow (Version 0). It reports false, changing
// nothing, when the flow is recorded already (a resubmission).
func (r *Redis) CreateFlow(ctx context.Context, f FlowRecord, retention time.Duration) (bool, error) {
	if retention <= 0 {
		retention = DefaultJobRetention
	}
	users, _ := json.Marshal(f.Users)
	fields := []any{"name", f.Name, "envelope", f.Envelope, "users", users, "submitted", f.Submitted.UTC().Format(timeFieldLayer), "run", f.Run, "version", 0}
	keys := []string{flowKey(f.ID), flowsIndex, flowsActive}
	for _, u := range f.Users {
		keys = append(keys, userFlowsKey(u))
	}
	args := append([]any{retention.Milliseconds(), f.Submitted.UnixMilli(), f.ID, len(fields) / 2}, fields...)
	n, err := createFlow.Run(ctx, r.rdb, keys, args...).Int()
	if err != nil {
		return false, fmt.Errorf("queue: create flow %s: %w", f.ID, err)
	}
	return n == 1, nil
}

// GetFlow reads a flow record; ErrNoFlow if there is none.
func (r *Redis) GetFlow(ctx context.Context, id string) (*FlowRecord, error) {
	m, err := r.rdb.HGetAll(ctx, flowKey(id)).Result()
	if err != nil {
		return nil, fmt.Errorf("queue: flow %s: %w", id, err)
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("flow %s: %w", id, ErrNoFlow)
	}
	f := &FlowRecord{ID: id, Name: m["name"], Envelope: []byte(m["envelope"]), Run: []byte(m["run"])}
	_ = json.Unmarshal([]byte(m["users"]), &f.Users)
	f.Submitted, _ = time.Parse(timeFieldLayer, m["submitted"])
	f.Version, _ = strconv.ParseInt(m["version"], 10, 64)
	return f, nil
}

// GetFlowProgress is GetFlow without the envelope (Envelope is nil): what
// an update or a stream reads, each time, of a flow whose envelope (up to
// 1 MiB) it has.
func (r *Redis) GetFlowProgress(ctx context.Context, id string) (*FlowRecord, error) {
	v, err := r.rdb.HMGet(ctx, flowKey(id), "name", "users", "submitted", "run", "version").Result()
	if err != nil {
		return nil, fmt.Errorf("queue: flow %s: %w", id, err)
	}
	str := func(i int) string { s, _ := v[i].(string); return s }
	if v[4] == nil {
		return nil, fmt.Errorf("flow %s: %w", id, ErrNoFlow)
	}
	f := &FlowRecord{ID: id, Name: str(0), Run: []byte(str(3))}
	_ = json.Unmarshal([]byte(str(1)), &f.Users)
	f.Submitted, _ = time.Parse(timeFieldLayer, str(2))
	f.Version, _ = strconv.ParseInt(str(4), 10, 64)
	return f, nil
}

// FlowVersion returns flow id's version: how many updates it had
// (ErrNoFlow if there is no such flow).
func (r *Redis) FlowVersion(ctx context.Context, id string) (int64, error) {
	v, err := r.rdb.HGet(ctx, flowKey(id), "version").Int64()
	if errors.Is(err, redis.Nil) {
		return 0, fmt.Errorf("flow %s: %w", id, ErrNoFlow)
	}
	if err != nil {
		return 0, fmt.Errorf("queue: flow %s: %w", id, err)
	}
	return v, nil
}

// updateFlow replaces a flow's progress if its version is still the one
// read, and records the step jobs about to start; a flow that ended
// leaves the active index. It returns the new version, or -1 on a
// conflict, -2 if the flow is gone. KEYS: the record, the active index,
// then each new step job's key; ARGV: the version read, the progress,
// retention (ms), ended (1/0), the flow's ID, then each step job's ref.
var updateFlow = redis.NewScript(`
local v = redis.call('HGET', KEYS[1], 'version')
if not v then
  redis.call('ZREM', KEYS[2], ARGV[5])
  return -2
end
if v ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'run', ARGV[2])
local nv = redis.call('HINCRBY', KEYS[1], 'version', 1)
if ARGV[4] == '1' then redis.call('ZREM', KEYS[2], ARGV[5]) end
for i = 3, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 3], 'PX', ARGV[3]) end
return nv
`)

// UpdateFlow writes progress run over version (as read), ended says it is
// the flow's end, and points each of steps' job IDs at the flow, in one
// step: a coord that dies after it
// has the flow and its started steps recorded together, and the jobs are
// submitted again by whoever resumes it (their derived IDs make that a
// duplicate). ErrFlowConflict if another update came first, ErrNoFlow if
// the flow is gone.
func (r *Redis) UpdateFlow(ctx context.Context, id string, version int64, run []byte, ended bool, steps map[string]StepRef, retention time.Duration) (int64, error) {
	if retention <= 0 {
		retention = DefaultJobRetention
	}
	keys := []string{flowKey(id), flowsActive}
	done := "0"
	if ended {
		done = "1"
	}
	args := []any{strconv.FormatInt(version, 10), run, retention.Milliseconds(), done, id}
	for jobID, ref := range steps {
		b, _ := json.Marshal(ref)
		keys = append(keys, flowStepKey(jobID))
		args = append(args, b)
	}
	n, err := updateFlow.Run(ctx, r.rdb, keys, args...).Int64()
	switch {
	case err != nil:
		return 0, fmt.Errorf("queue: update flow %s: %w", id, err)
	case n == -1:
		return 0, ErrFlowConflict
	case n == -2:
		return 0, fmt.Errorf("flow %s: %w", id, ErrNoFlow)
	}
	return n, nil
}

// FlowSteps looks up which flow step each job ID is (ok false for a job
// that is no step of a flow).
func (r *Redis) FlowSteps(ctx context.Context, jobIDs ...string) ([]StepRef, []bool, error) {
	if len(jobIDs) == 0 {
		return nil, nil, nil
	}
	keys := make([]string, len(jobIDs))
	for i, id := range jobIDs {
		keys[i] = flowStepKey(id)
	}
	vals, err := r.rdb.MGet(ctx, keys...).Result()
	if err != nil {
		return nil, nil, fmt.Errorf("queue: flow steps: %w", err)
	}
	refs, ok := make([]StepRef, len(jobIDs)), make([]bool, len(jobIDs))
	for i, v := range vals {
		s, isStr := v.(string)
		if isStr && json.Unmarshal([]byte(s), &refs[i]) == nil {
			ok[i] = true
		}
	}
	return refs, ok, nil
}

// ListFlows returns flow IDs, newest first: a user's (user != "") or all.
func (r *Redis) ListFlows(ctx context.Context, user string, limit int64) ([]string, error) {
	key := flowsIndex
	if user != "" {
		key = userFlowsKey(user)
	}
	if limit <= 0 {
		limit = 50
	}
	ids, err := r.rdb.ZRevRange(ctx, key, 0, limit-1).Result()
	if err != nil {
		return nil, fmt.Errorf("queue: list flows: %w", err)
	}
	return ids, nil
}

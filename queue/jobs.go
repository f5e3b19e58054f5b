package queue

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/writ-fleet/writ/job"
)

// DefaultJobRetention is how long coord keeps a job's record.
const DefaultJobRetention = 7 * 24 * time.Hour

const (
	jobsIndex      = "writ:coord:jobs"
	pendingDue     = "writ:coord:pending:due"
	pendingEnvs    = "writ:coord:pending:env"
	maxJobEvents   = 2000
	timeFieldLayer = time.RFC3339Nano
)

func jobKey(id string) string       { return "writ:coord:job:" + id }
func jobEventsKey(id string) string { return "writ:coord:job:" + id + ":events" }
func siteIndex(site string) string  { return "writ:coord:site:" + site + ":jobs" }
func cursorKey(site string) string  { return "writ:coord:cursor:" + site }

// createJob writes a job record's fields that are not set yet, and indexes
// it. Events may reach coord before the record is written (a fast job), so
// fields that events set are never overwritten here. It returns the state
// the record already had, or "".
var createJob = redis.NewScript(`
local cur = redis.call('HGET', KEYS[1], 'state')
local state
for i = 4, #ARGV, 2 do if ARGV[i] == 'state' then state = ARGV[i+1] end end
if cur == 'rejected' and state ~= 'rejected' then
  -- A copy of the job was refused (a bad signature added, one removed);
  -- this one passed: it replaces the refusal.
  redis.call('DEL', KEYS[1])
  cur = nil
end
for i = 4, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i+1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], 'NX', ARGV[1], ARGV[2])
return cur or ''
`)

// applyEvents applies a batch of stream events to job records. Each event
// is applied only if it is newer than the last one applied to its job
// (stream IDs order a site's events), so replays after a coord restart and
// several coords following one site are harmless. KEYS holds each event's
// job key and events key; ARGV is retention (ms), the events kept per job,
// then per event: its number of field/value pairs, its stream ID, its JSON
// and the pairs.
var applyEvents = redis.NewScript(`
local retention, keep = ARGV[1], tonumber(ARGV[2])
local a = 3
for k = 1, #KEYS, 2 do
  local job, evs = KEYS[k], KEYS[k+1]
  local n, seq, raw = tonumber(ARGV[a]), ARGV[a+1], ARGV[a+2]
  local fields = {}
  for i = 1, 2*n do fields[i] = ARGV[a+2+i] end
  a = a + 3 + 2*n
  local newer = true
  local last = redis.call('HGET', job, 'last_event')
  if last then
    local lm, ls = string.match(last, '(%d+)-(%d+)')
    local nm, ns = string.match(seq, '(%d+)-(%d+)')
    lm, ls, nm, ns = tonumber(lm), tonumber(ls), tonumber(nm), tonumber(ns)
    newer = nm > lm or (nm == lm and ns > ls)
  end
  if newer then
    if fields[1] == 'state' then
      local cur = redis.call('HGET', job, 'state')
      if fields[2] == 'queued' then
        -- The supervisor publishes "queued" after enqueuing, so a fast
        -- runner's events can precede it: it must not move a job back.
        if cur and cur ~= 'pending' and cur ~= 'queued' then fields[2] = cur end
      elseif (cur == 'succeeded' or cur == 'failed') and fields[2] ~= 'succeeded' and fields[2] ~= 'failed' then
        -- A job that ended stays ended: a run that should not have
        -- happened (see Publish) cannot move it back to running; its
        -- events are kept in the job's list, as history.
        fields = {}
      end
    end
    redis.call('HSET', job, 'last_event', seq, unpack(fields))
    redis.call('RPUSH', evs, raw)
    redis.call('LTRIM', evs, -keep, -1)
    redis.call('PEXPIRE', job, retention)
    redis.call('PEXPIRE', evs, retention)
  end
end
return 1
`)

// NewJobRecord is a job coord has just accepted or rejected.
type NewJobRecord struct {
	Job job.Record
	// Envelope is kept for redelivery while State is pending.
	Envelope []byte
}

// CreateJobs records jobs in one round trip, never overwriting what an
// earlier submission or an event already set, and returns for each the
// state it already had ("" when it was new).
// Pending jobs are also put on the delivery list, due at once.
func (r *Redis) CreateJobs(ctx context.Context, recs []NewJobRecord, retention time.Duration) ([]job.State, error) {
	if retention == 0 {
		retention = DefaultJobRetention
	}
	cmds := make([]*redis.Cmd, len(recs))
	var wait *redis.IntCmd
	err := r.execScripts(ctx, func(pipe redis.Pipeliner) {
		for i, rec := range recs {
			j := rec.Job
			args := []any{j.SubmittedAt.UnixMilli(), j.ID, retention.Milliseconds(),
				"id", j.ID, "name", j.Name, "site", j.Site, "node", j.Node, "state", string(j.State),
				"submitted_at", j.SubmittedAt.UTC().Format(timeFieldLayer)}
			if j.Reason != "" || j.Error != "" {
				args = append(args, "reason", string(j.Reason), "error", j.Error)
			}
			if len(j.Users) > 0 {
				args = append(args, "users", strings.Join(j.Users, ","))
			}
			cmds[i] = createJob.Run(ctx, pipe, []string{jobKey(j.ID), jobsIndex, siteIndex(j.Site)}, args...)
			if j.State == job.StatePending {
				pipe.HSet(ctx, pendingEnvs, j.ID, rec.Envelope)
				pipe.ZAddNX(ctx, pendingDue, redis.Z{Score: float64(time.Now().UnixMilli()), Member: j.ID})
			}
		}
		wait = r.waitReplicas(ctx, pipe)
	})
	if err != nil {
		return nil, fmt.Errorf("record jobs: %w", err)
	}
	if err := r.replicated(wait); err != nil {
		return nil, fmt.Errorf("record jobs: %w", err)
	}
	out := make([]job.State, len(recs))
	for i, c := range cmds {
		s, err := c.Text()
		if err != nil {
			return nil, fmt.Errorf("record job: %w", err)
		}
		out[i] = job.State(s)
	}
	return out, nil
}

// ApplyEvents applies events of site to job records and advances the site's
// cursor to the last one, in one round trip and one script call. The script
// touches many keys, so a Redis Cluster deployment must keep coord's keys in
// one slot (coord's Redis is its own; the sites' Redis may be clustered).
func (r *Redis) ApplyEvents(ctx context.Context, site string, events []job.Event, retention time.Duration) error {
	if len(events) == 0 {
		return nil
	}
	if retention == 0 {
		retention = DefaultJobRetention
	}
	keysList := make([]string, 0, 2*len(events))
	args := []any{retention.Milliseconds(), maxJobEvents}
	for _, ev := range events {
		raw, _ := json.Marshal(ev)
		at := ev.At.UTC().Format(timeFieldLayer)
		var fields []any
		if s := job.StateOf(ev.Type); s != "" {
			fields = append(fields, "state", string(s))
		}
		switch ev.Type {
		case job.EventQueued:
			fields = append(fields, "queued_at", at)
		case job.EventStarted:
			fields = append(fields, "started_at", at, "node", ev.Node, "attempts", ev.Attempt)
		case job.EventRetrying:
			fields = append(fields, "error", ev.Error, "reason", string(ev.Reason))
		case job.EventSucceeded:
			fields = append(fields, "finished_at", at, "result", string(ev.Result), "error", "", "reason", "")
			if len(ev.ResultSig) > 0 {
				fields = append(fields, "node", ev.Node, "result_sig", base64.StdEncoding.EncodeToString(ev.ResultSig))
			}
		case job.EventFailed, job.EventRejected:
			fields = append(fields, "finished_at", at, "error", ev.Error, "reason", string(ev.Reason))
		}
		keysList = append(keysList, jobKey(ev.Job), jobEventsKey(ev.Job))
		args = append(args, len(fields)/2, ev.Seq, raw)
		args = append(args, fields...)
	}
	err := r.execScripts(ctx, func(pipe redis.Pipeliner) {
		applyEvents.Run(ctx, pipe, keysList, args...)
		pipe.Set(ctx, cursorKey(site), events[len(events)-1].Seq, 0)
	})
	if err != nil {
		return fmt.Errorf("apply events: %w", err)
	}
	return nil
}

// execScripts runs a pipeline that calls Lua scripts by hash. Redis forgets
// scripts when it restarts, so on NOSCRIPT it loads them and runs the
// pipeline again; every pipeline built here is safe to repeat.
func (r *Redis) execScripts(ctx context.Context, build func(redis.Pipeliner)) error {
	for try := 0; ; try++ {
		pipe := r.rdb.Pipeline()
		build(pipe)
		_, err := pipe.Exec(ctx)
		if err == nil || errors.Is(err, redis.Nil) {
			return nil
		}
		if try > 0 || !strings.Contains(err.Error(), "NOSCRIPT") {
			return err
		}
		for _, s := range []*redis.Script{createJob, applyEvents, resolvePending, publishEnd} {
			if err := s.Load(ctx, r.rdb).Err(); err != nil {
				return err
			}
		}
	}
}

// Cursor returns the last event of site that coord applied ("0" if none).
func (r *Redis) Cursor(ctx context.Context, site string) (string, error) {
	c, err := r.rdb.Get(ctx, cursorKey(site)).Result()
	if errors.Is(err, redis.Nil) {
		return "0", nil
	}
	return c, err
}

// ErrNoJob is returned for an unknown job ID.
var ErrNoJob = errors.New("no such job")

// GetJob returns a job record.
func (r *Redis) GetJob(ctx context.Context, id string) (*job.Record, error) {
	m, err := r.rdb.HGetAll(ctx, jobKey(id)).Result()
	if err != nil {
		return nil, fmt.Errorf("get job: %w", err)
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("job %s: %w", id, ErrNoJob)
	}
	return jobFromHash(m), nil
}

func jobFromHash(m map[string]string) *job.Record {
	t := func(k string) *time.Time {
		v, ok := m[k]
		if !ok || v == "" {
			return nil
		}
		tt, err := time.Parse(timeFieldLayer, v)
		if err != nil {
			return nil
		}
		return &tt
	}
	j := &job.Record{ID: m["id"], Name: m["name"], Site: m["site"], Node: m["node"], State: job.State(m["state"]),
		Reason: job.Reason(m["reason"]), Error: m["error"], QueuedAt: t("queued_at"), StartedAt: t("started_at"), FinishedAt: t("finished_at")}
	if s := t("submitted_at"); s != nil {
		j.SubmittedAt = *s
	}
	j.Attempts, _ = strconv.Atoi(m["attempts"])
	if u := m["users"]; u != "" {
		j.Users = strings.Split(u, ",")
	}
	if r := m["result"]; r != "" {
		j.Result = json.RawMessage(r)
	}
	j.ResultSig, _ = base64.StdEncoding.DecodeString(m["result_sig"])
	return j
}

// JobEvents returns a job's recorded events, oldest first.
func (r *Redis) JobEvents(ctx context.Context, id string) ([]job.Event, error) {
	raws, err := r.rdb.LRange(ctx, jobEventsKey(id), 0, -1).Result()
	if err != nil {
		return nil, fmt.Errorf("job events: %w", err)
	}
	out := make([]job.Event, 0, len(raws))
	for _, raw := range raws {
		var ev job.Event
		if json.Unmarshal([]byte(raw), &ev) == nil {
			out = append(out, ev)
		}
	}
	return out, nil
}

// ListFilter selects jobs for ListJobs.
type ListFilter struct {
	Site  string
	State job.State
	// Before pages backwards: only jobs submitted before this cursor (as
	// returned in NextBefore); 0 means from the newest.
	Before int64
	// Keep, when set, selects the jobs to return (coord: those the caller
	// may read); applied while scanning like State.
	Keep  func(*job.Record) bool `json:"-"`
	Limit int
}

// ListJobs returns jobs newest first and the cursor of the next page (0
// when there is none). A state filter is applied while scanning, at most
// 20 pages deep.
func (r *Redis) ListJobs(ctx context.Context, f ListFilter) ([]job.Record, int64, error) {
	if f.Limit <= 0 || f.Limit > 1000 {
		f.Limit = 100
	}
	index := jobsIndex
	if f.Site != "" {
		index = siteIndex(f.Site)
	}
	max := "+inf"
	if f.Before > 0 {
		max = "(" + strconv.FormatInt(f.Before, 10)
	}
	var out []job.Record
	for scans := 0; scans < 20 && len(out) < f.Limit; scans++ {
		zs, err := r.rdb.ZRevRangeByScoreWithScores(ctx, index, &redis.ZRangeBy{Max: max, Min: "-inf", Count: int64(f.Limit)}).Result()
		if err != nil {
			return nil, 0, fmt.Errorf("list jobs: %w", err)
		}
		if len(zs) == 0 {
			return out, 0, nil
		}
		pipe := r.rdb.Pipeline()
		cmds := make([]*redis.MapStringStringCmd, len(zs))
		for i, z := range zs {
			cmds[i] = pipe.HGetAll(ctx, jobKey(z.Member.(string)))
		}
		if _, err := pipe.Exec(ctx); err != nil {
			return nil, 0, fmt.Errorf("list jobs: %w", err)
		}
		for i, c := range cmds {
			m := c.Val()
			if len(m) == 0 {
				continue // expired record; the index entry goes with trimming
			}
			j := jobFromHash(m)
			if (f.State == "" || j.State == f.State) && (f.Keep == nil || f.Keep(j)) {
				out = append(out, *j)
			}
			f.Before = int64(zs[i].Score)
			if len(out) == f.Limit {
				return out, f.Before, nil
			}
		}
		max = "(" + strconv.FormatInt(f.Before, 10)
		if len(zs) < f.Limit {
			return out, 0, nil
		}
	}
	return out, f.Before, nil
}

// TrimJobIndex removes index entries older than retention.
func (r *Redis) TrimJobIndex(ctx context.Context, sites []string, retention time.Duration) error {
	if retention == 0 {
		retention = DefaultJobRetention
	}
	cut := "(" + strconv.FormatInt(time.Now().Add(-retention).UnixMilli(), 10)
	pipe := r.rdb.Pipeline()
	pipe.ZRemRangeByScore(ctx, jobsIndex, "-inf", cut)
	for _, s := range sites {
		pipe.ZRemRangeByScore(ctx, siteIndex(s), "-inf", cut)
	}
	_, err := pipe.Exec(ctx)
	return err
}

// PendingDelivery is a job coord still has to deliver to its supervisor.
type PendingDelivery struct {
	ID       string
	Envelope []byte
}

// DuePending returns up to limit pending deliveries due by now.
func (r *Redis) DuePending(ctx context.Context, now time.Time, limit int64) ([]PendingDelivery, error) {
	ids, err := r.rdb.ZRangeByScore(ctx, pendingDue, &redis.ZRangeBy{Min: "-inf", Max: strconv.FormatInt(now.UnixMilli(), 10), Count: limit}).Result()
	if err != nil || len(ids) == 0 {
		return nil, err
	}
	envs, err := r.rdb.HMGet(ctx, pendingEnvs, ids...).Result()
	if err != nil {
		return nil, err
	}
	out := make([]PendingDelivery, 0, len(ids))
	for i, id := range ids {
		if s, ok := envs[i].(string); ok {
			out = append(out, PendingDelivery{ID: id, Envelope: []byte(s)})
		} else {
			r.rdb.ZRem(ctx, pendingDue, id)
		}
	}
	return out, nil
}

// RetryPendingAt reschedules a pending delivery.
func (r *Redis) RetryPendingAt(ctx context.Context, id string, at time.Time) error {
	return r.rdb.ZAdd(ctx, pendingDue, redis.Z{Score: float64(at.UnixMilli()), Member: id}).Err()
}

// DonePending removes deliveries that reached their supervisor (or were
// refused by it).
func (r *Redis) DonePending(ctx context.Context, ids ...string) error {
	if len(ids) == 0 {
		return nil
	}
	pipe := r.rdb.Pipeline()
	members := make([]any, len(ids))
	for i, id := range ids {
		members[i] = id
	}
	pipe.ZRem(ctx, pendingDue, members...)
	pipe.HDel(ctx, pendingEnvs, ids...)
	_, err := pipe.Exec(ctx)
	return err
}

// resolvePending sets a job's state only while it is still pending, so a
// late verdict never overwrites what the site's events already said.
var resolvePending = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'reason', ARGV[2], 'error', ARGV[3])
return 1
`)

// ResolvePending records the verdict on a job that was pending delivery.
func (r *Redis) ResolvePending(ctx context.Context, id string, s job.State, reason job.Reason, msg string) error {
	return r.execScripts(ctx, func(pipe redis.Pipeliner) {
		resolvePending.Run(ctx, pipe, []string{jobKey(id)}, string(s), string(reason), msg)
	})
}

package queue

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/writ-fleet/writ/internal/redisproc"
	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/job"
)

// TestAOF_CoordRecordsSurviveKill: coord's records, written with every
// write fsynced and logged in as the coord user, are all there after
// kill -9 of Redis, twice over (redisproc's workaround for
// redis/redis#14541: without it the append-only file's transactions and
// scripts are dropped on load).
func TestAOF_CoordRecordsSurviveKill(t *testing.T) {
	testenv.RequireBinary(t, "redis-server")
	ctx := context.Background()
	cfg := redisproc.Config{Dir: t.TempDir(), Port: testenv.FreePort(t), Persist: true, Fsync: "always",
		Users: []redisproc.User{{Name: ACLCoord, Password: "coord-password", Rules: ACLRules(ACLCoord, "")}}}
	cfg.Log = filepath.Join(cfg.Dir, "redis.log")
	var ids []string
	for round := 0; round < 3; round++ {
		p, err := redisproc.Start(cfg)
		if err != nil {
			t.Fatal(err)
		}
		r, err := Dial(p.UserURL(ACLCoord), Credentials{Password: "coord-password"})
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range ids {
			if _, err := r.GetJob(ctx, id); err != nil {
				t.Errorf("round %d: job %s: %v", round, id, err)
			}
		}
		var recs []NewJobRecord
		for i := 0; i < 3; i++ {
			id := testenv.Itoa(round) + "-" + testenv.Itoa(i)
			ids = append(ids, id)
			recs = append(recs, NewJobRecord{Job: job.Record{ID: id, Site: "s", State: job.StateQueued, SubmittedAt: time.Now()}, Envelope: []byte(`{}`)})
		}
		if _, err := r.CreateJobs(ctx, recs, 0); err != nil {
			t.Fatal(err)
		}
		r.Close()
		p.Kill()
	}
}

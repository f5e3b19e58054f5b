package sqlstore_test

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/writ-fleet/writ/internal/testenv"
	"github.com/writ-fleet/writ/ledger"
	"github.com/writ-fleet/writ/ledger/store/postgres"
	"github.com/writ-fleet/writ/ledger/store/sqlstore"
)

// BenchmarkReportUptime_Postgres: uptime reports from 16 goroutines into
// PostgreSQL, as the one statement the postgres dialect uses and as the
// transaction of three that other stores run; ns/op and the p99 of one
// report.
func BenchmarkReportUptime_Postgres(b *testing.B) {
	url := testenv.Postgres(b)
	for _, tc := range []struct {
		name string
		d    sqlstore.Dialect
	}{
		{"one-statement", postgres.Dialect},
		{"transaction", func() sqlstore.Dialect { d := postgres.Dialect; d.ReportUptime = ""; return d }()},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := context.Background()
			db, err := sql.Open("pgx", url)
			if err != nil {
				b.Fatal(err)
			}
			db.SetMaxOpenConns(postgres.MaxConns)
			db.SetMaxIdleConns(postgres.MaxConns)
			s, err := sqlstore.New(ctx, db, tc.d)
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			const nodes = 1000
			ids := make([]string, nodes)
			for i := range ids {
				ids[i] = fmt.Sprintf("bench-%s-%d", tc.name, i)
				n := ledger.Node{ID: ids[i], Site: "a", PublicKey: "ssh-ed25519 " + ids[i], RegisteredAt: time.Now()}
				if _, err := s.RegisterNode(ctx, n, ""); err != nil {
					b.Fatal(err)
				}
			}
			var next atomic.Int64
			var mu sync.Mutex
			var lat []time.Duration
			start := time.Now()
			b.SetParallelism(8) // 16 goroutines on 2 cores
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				var mine []time.Duration
				for pb.Next() {
					k := next.Add(1)
					t0 := time.Now()
					// Each report is a microsecond after the node's last.
					at := start.Add(time.Duration(k) * time.Microsecond)
					if _, _, err := s.ReportUptime(ctx, ids[k%nodes], ledger.Uptime{BootID: "b", UptimeSeconds: k, At: at}); err != nil {
						b.Error(err)
						return
					}
					mine = append(mine, time.Since(t0))
				}
				mu.Lock()
				lat = append(lat, mine...)
				mu.Unlock()
			})
			b.StopTimer()
			if len(lat) > 0 {
				slices.Sort(lat)
				b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
				b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			}
		})
	}
}

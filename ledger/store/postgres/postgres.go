// Package postgres is the ledger store for fleets of more than one machine:
// PostgreSQL through pgx (database/sql), over the shared SQL store
// (sqlstore), with the same migrations as SQLite.
package postgres

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver

	"github.com/writ-fleet/writ/ledger/store/sqlstore"
)

// Dialect is PostgreSQL's: constraint violations by SQLSTATE, and an
// uptime report as one statement (data-modifying CTEs): the node's row
// locked and read, updated only if the report is after the last one, and a
// new boot recorded, in one round trip and one commit.
var Dialect = sqlstore.Dialect{
	Name:         "postgres",
	IsUnique:     func(err error) bool { return sqlState(err) == "23505" },
	IsForeignKey: func(err error) bool { return sqlState(err) == "23503" },
	ReportUptime: `
WITH old AS (
  SELECT boot_id, last_report FROM nodes WHERE id = $5 FOR UPDATE
), upd AS (
  UPDATE nodes SET boot_id = $1, uptime_seconds = $2, last_report = $3, used = $4,
    boots = nodes.boots + CASE WHEN old.boot_id <> $1 THEN 1 ELSE 0 END
  FROM old
  WHERE nodes.id = $5
    AND CASE WHEN old.last_report = '' THEN true ELSE old.last_report::timestamptz < $3::text::timestamptz END
  RETURNING nodes.boots
), ins AS (
  INSERT INTO node_boots (node, boot_id, first_seen)
  SELECT $5, $1, $3 FROM old WHERE old.boot_id <> $1 AND EXISTS (SELECT 1 FROM upd)
  ON CONFLICT (node, boot_id) DO NOTHING
)
SELECT old.boot_id, old.last_report, COALESCE((SELECT boots FROM upd), -1) FROM old`,
}

func sqlState(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// MaxConns bounds one ledger process's connections to PostgreSQL.
var MaxConns = 24

// Open connects to the database at url (postgres://…) and applies pending
// migrations.
func Open(ctx context.Context, url string) (*sqlstore.Store, error) {
	db, err := sql.Open("pgx", url)
	if err != nil {
		return nil, fmt.Errorf("open ledger database: %w", err)
	}
	// Bounded, so a burst of requests waits for a connection instead of
	// passing PostgreSQL's max_connections (100 by default) and failing;
	// several ledger processes share that limit.
	db.SetMaxOpenConns(MaxConns)
	db.SetMaxIdleConns(MaxConns)
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open ledger database: %w", err)
	}
	s, err := sqlstore.New(ctx, db, Dialect)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open ledger database: %w", err)
	}
	return s, nil
}

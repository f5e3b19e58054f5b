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

// Dialect is PostgreSQL's: constraint violations by SQLSTATE.
var Dialect = sqlstore.Dialect{
	Name:         "postgres",
	IsUnique:     func(err error) bool { return sqlState(err) == "23505" },
	IsForeignKey: func(err error) bool { return sqlState(err) == "23503" },
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

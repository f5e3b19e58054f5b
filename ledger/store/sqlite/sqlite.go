// Package sqlite is the embedded ledger store: one SQLite file through the
// pure-Go modernc.org/sqlite driver, over the shared SQL store (sqlstore).
package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"strings"

	_ "modernc.org/sqlite" // registers the "sqlite" driver

	"github.com/writ-fleet/writ/ledger/store/sqlstore"
)

// Dialect is SQLite's: how it words constraint violations.
var Dialect = sqlstore.Dialect{
	Name:         "sqlite",
	IsUnique:     func(err error) bool { return strings.Contains(err.Error(), "UNIQUE constraint failed") },
	IsForeignKey: func(err error) bool { return strings.Contains(err.Error(), "FOREIGN KEY") },
}

// Open opens (creating if needed) the store at path and applies pending
// migrations.
func Open(ctx context.Context, path string) (*sqlstore.Store, error) {
	dsn := "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)&_txlock=immediate"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open ledger %s: %w", path, err)
	}
	// One connection: SQLite serializes writers anyway, and one connection
	// keeps its prepared statements warm and never waits in the busy
	// handler behind another of ours.
	db.SetMaxOpenConns(1)
	s, err := sqlstore.New(ctx, db, Dialect)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open ledger %s: %w", path, err)
	}
	return s, nil
}

// Package sqlite is the embedded ledger store: one SQLite file (through the
// pure-Go modernc.org/sqlite driver), schema managed by numbered migrations.
package sqlite

import (
	"context"
	"database/sql"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strconv"
	"strings"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver

	"github.com/writ-fleet/writ/ledger"
)

//go:embed migrations/*.sql
var migrations embed.FS

// Store is a ledger store in one SQLite file.
type Store struct {
	db *sql.DB
}

var _ ledger.Store = (*Store)(nil)

// Open opens (creating if needed) the store at path and applies pending
// migrations.
func Open(ctx context.Context, path string) (*Store, error) {
	dsn := "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)&_txlock=immediate"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open ledger %s: %w", path, err)
	}
	s := &Store{db: db}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open ledger %s: %w", path, err)
	}
	return s, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// Ping checks the database answers.
func (s *Store) Ping(ctx context.Context) error { return s.db.PingContext(ctx) }

func (s *Store) migrate(ctx context.Context) error {
	if _, err := s.db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)`); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	files, err := fs.Glob(migrations, "migrations/*.sql")
	if err != nil {
		return err
	}
	sort.Strings(files)
	for _, f := range files {
		base := strings.TrimPrefix(f, "migrations/")
		v, err := strconv.Atoi(strings.SplitN(base, "_", 2)[0])
		if err != nil {
			return fmt.Errorf("migration %s: name must start with a number", f)
		}
		var n int
		if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM schema_migrations WHERE version = ?`, v).Scan(&n); err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
		if n > 0 {
			continue
		}
		body, err := migrations.ReadFile(f)
		if err != nil {
			return err
		}
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return fmt.Errorf("migrate %s: %w", base, err)
		}
		if _, err := tx.ExecContext(ctx, string(body)); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate %s: %w", base, err)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)`, v, time.Now().UTC().Format(time.RFC3339)); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate %s: %w", base, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migrate %s: %w", base, err)
		}
	}
	return nil
}

func ts(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

func parseTS(s string) time.Time {
	t, _ := time.Parse(time.RFC3339Nano, s)
	return t
}

func isUnique(err error) bool {
	return err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed")
}

// CreateUser inserts a user with its roles and keys in one transaction.
func (s *Store) CreateUser(ctx context.Context, u ledger.User) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("create user: %w", err)
	}
	defer tx.Rollback()
	if u.CreatedAt.IsZero() {
		u.CreatedAt = time.Now()
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO users (name, disabled, created_at) VALUES (?, 0, ?)`, u.Name, ts(u.CreatedAt)); err != nil {
		if isUnique(err) {
			return fmt.Errorf("create user %s: %w", u.Name, ledger.ErrExists)
		}
		return fmt.Errorf("create user: %w", err)
	}
	for site, role := range u.Roles {
		if _, err := tx.ExecContext(ctx, `INSERT INTO roles (user, site, role) VALUES (?, ?, ?)`, u.Name, site, role); err != nil {
			return fmt.Errorf("create user: role: %w", err)
		}
	}
	for _, k := range u.Keys {
		if _, err := tx.ExecContext(ctx, `INSERT INTO keys (id, user, public_key, created_at) VALUES (?, ?, ?, ?)`, k.ID, u.Name, k.PublicKey, ts(u.CreatedAt)); err != nil {
			if isUnique(err) {
				return fmt.Errorf("create user: key %s: %w", k.ID, ledger.ErrExists)
			}
			return fmt.Errorf("create user: key: %w", err)
		}
	}
	return tx.Commit()
}

// GetUser returns a user with roles and keys.
func (s *Store) GetUser(ctx context.Context, name string) (*ledger.User, error) {
	u := ledger.User{Name: name, Roles: map[string]string{}}
	var created string
	err := s.db.QueryRowContext(ctx, `SELECT disabled, created_at FROM users WHERE name = ?`, name).Scan(&u.Disabled, &created)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("user %s: %w", name, ledger.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get user: %w", err)
	}
	u.CreatedAt = parseTS(created)
	rows, err := s.db.QueryContext(ctx, `SELECT site, role FROM roles WHERE user = ?`, name)
	if err != nil {
		return nil, fmt.Errorf("get user roles: %w", err)
	}
	for rows.Next() {
		var site, role string
		if err := rows.Scan(&site, &role); err != nil {
			rows.Close()
			return nil, err
		}
		u.Roles[site] = role
	}
	rows.Close()
	keyRows, err := s.db.QueryContext(ctx, `SELECT id, public_key, created_at, revoked_at FROM keys WHERE user = ? ORDER BY created_at`, name)
	if err != nil {
		return nil, fmt.Errorf("get user keys: %w", err)
	}
	defer keyRows.Close()
	for keyRows.Next() {
		k, err := scanKey(keyRows, name)
		if err != nil {
			return nil, err
		}
		u.Keys = append(u.Keys, *k)
	}
	return &u, keyRows.Err()
}

type scanner interface{ Scan(...any) error }

func scanKey(r scanner, user string) (*ledger.Key, error) {
	var k ledger.Key
	var created string
	var revoked sql.NullString
	if err := r.Scan(&k.ID, &k.PublicKey, &created, &revoked); err != nil {
		return nil, err
	}
	k.User = user
	k.CreatedAt = parseTS(created)
	if revoked.Valid {
		t := parseTS(revoked.String)
		k.RevokedAt = &t
	}
	return &k, nil
}

// ListUsers returns every user.
func (s *Store) ListUsers(ctx context.Context) ([]ledger.User, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT name FROM users ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("list users: %w", err)
	}
	var names []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			rows.Close()
			return nil, err
		}
		names = append(names, n)
	}
	rows.Close()
	users := make([]ledger.User, 0, len(names))
	for _, n := range names {
		u, err := s.GetUser(ctx, n)
		if err != nil {
			return nil, err
		}
		users = append(users, *u)
	}
	return users, nil
}

// SetUserDisabled disables or re-enables a user.
func (s *Store) SetUserDisabled(ctx context.Context, name string, disabled bool) error {
	res, err := s.db.ExecContext(ctx, `UPDATE users SET disabled = ? WHERE name = ?`, disabled, name)
	return affected(res, err, "user "+name)
}

func affected(res sql.Result, err error, what string) error {
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("%s: %w", what, ledger.ErrNotFound)
	}
	return nil
}

// SetRole binds user to role on site ("*" for all); an empty role removes
// the binding.
func (s *Store) SetRole(ctx context.Context, user, site, role string) error {
	if _, err := s.GetUser(ctx, user); err != nil {
		return err
	}
	if role == "" {
		_, err := s.db.ExecContext(ctx, `DELETE FROM roles WHERE user = ? AND site = ?`, user, site)
		return err
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO roles (user, site, role) VALUES (?, ?, ?) ON CONFLICT(user, site) DO UPDATE SET role = excluded.role`, user, site, role)
	if err != nil {
		return fmt.Errorf("set role: %w", err)
	}
	return nil
}

// AddKey adds a key to an existing user.
func (s *Store) AddKey(ctx context.Context, k ledger.Key) error {
	if k.CreatedAt.IsZero() {
		k.CreatedAt = time.Now()
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO keys (id, user, public_key, created_at) VALUES (?, ?, ?, ?)`, k.ID, k.User, k.PublicKey, ts(k.CreatedAt))
	switch {
	case isUnique(err):
		return fmt.Errorf("key %s: %w", k.ID, ledger.ErrExists)
	case err != nil && strings.Contains(err.Error(), "FOREIGN KEY"):
		return fmt.Errorf("user %s: %w", k.User, ledger.ErrNotFound)
	case err != nil:
		return fmt.Errorf("add key: %w", err)
	}
	return nil
}

// GetKey returns a key by ID.
func (s *Store) GetKey(ctx context.Context, id string) (*ledger.Key, error) {
	var user string
	row := s.db.QueryRowContext(ctx, `SELECT id, public_key, created_at, revoked_at, user FROM keys WHERE id = ?`, id)
	var k ledger.Key
	var created string
	var revoked sql.NullString
	err := row.Scan(&k.ID, &k.PublicKey, &created, &revoked, &user)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("key %s: %w", id, ledger.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get key: %w", err)
	}
	k.User, k.CreatedAt = user, parseTS(created)
	if revoked.Valid {
		t := parseTS(revoked.String)
		k.RevokedAt = &t
	}
	return &k, nil
}

// RevokeKey marks a key revoked; revoking twice keeps the first time.
func (s *Store) RevokeKey(ctx context.Context, id string, at time.Time) error {
	res, err := s.db.ExecContext(ctx, `UPDATE keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?`, ts(at), id)
	return affected(res, err, "key "+id)
}

// PutSite creates or replaces a site.
func (s *Store) PutSite(ctx context.Context, site ledger.Site) error {
	roles, _ := json.Marshal(site.Policy.Roles)
	_, err := s.db.ExecContext(ctx, `INSERT INTO sites (name, supervisor_url, policy_roles, threshold) VALUES (?, ?, ?, ?)
		ON CONFLICT(name) DO UPDATE SET supervisor_url = excluded.supervisor_url, policy_roles = excluded.policy_roles, threshold = excluded.threshold`,
		site.Name, site.SupervisorURL, string(roles), site.Policy.Threshold)
	if err != nil {
		return fmt.Errorf("put site: %w", err)
	}
	return nil
}

func scanSite(r scanner) (*ledger.Site, error) {
	var site ledger.Site
	var roles string
	if err := r.Scan(&site.Name, &site.SupervisorURL, &roles, &site.Policy.Threshold); err != nil {
		return nil, err
	}
	if err := json.Unmarshal([]byte(roles), &site.Policy.Roles); err != nil {
		return nil, fmt.Errorf("site %s: bad policy roles: %w", site.Name, err)
	}
	return &site, nil
}

// GetSite returns a site.
func (s *Store) GetSite(ctx context.Context, name string) (*ledger.Site, error) {
	site, err := scanSite(s.db.QueryRowContext(ctx, `SELECT name, supervisor_url, policy_roles, threshold FROM sites WHERE name = ?`, name))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("site %s: %w", name, ledger.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get site: %w", err)
	}
	return site, nil
}

// ListSites returns every site.
func (s *Store) ListSites(ctx context.Context) ([]ledger.Site, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT name, supervisor_url, policy_roles, threshold FROM sites ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("list sites: %w", err)
	}
	defer rows.Close()
	var out []ledger.Site
	for rows.Next() {
		site, err := scanSite(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, *site)
	}
	return out, rows.Err()
}

// Trust returns the site and the keys of users with a role on it or on "*"
// (a site binding wins over "*").
func (s *Store) Trust(ctx context.Context, site string) (*ledger.Trust, error) {
	st, err := s.GetSite(ctx, site)
	if err != nil {
		return nil, err
	}
	rows, err := s.db.QueryContext(ctx, `
		SELECT k.id, k.public_key, k.user, k.revoked_at IS NOT NULL, u.disabled,
		       COALESCE((SELECT role FROM roles r WHERE r.user = k.user AND r.site = ?),
		                (SELECT role FROM roles r WHERE r.user = k.user AND r.site = '*'))
		FROM keys k JOIN users u ON u.name = k.user
		WHERE EXISTS (SELECT 1 FROM roles r WHERE r.user = k.user AND r.site IN (?, '*'))
		ORDER BY k.id`, site, site)
	if err != nil {
		return nil, fmt.Errorf("trust %s: %w", site, err)
	}
	defer rows.Close()
	t := &ledger.Trust{Site: *st, AsOf: time.Now().UTC()}
	for rows.Next() {
		var sg ledger.Signer
		if err := rows.Scan(&sg.KeyID, &sg.PublicKey, &sg.User, &sg.Revoked, &sg.Disabled, &sg.Role); err != nil {
			return nil, err
		}
		t.Signers = append(t.Signers, sg)
	}
	return t, rows.Err()
}

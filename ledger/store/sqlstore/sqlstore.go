// Package sqlstore is the ledger store over database/sql, shared by the
// SQLite and PostgreSQL drivers (ledger/store/sqlite, ledger/store/postgres):
// one set of numbered migrations and one set of queries, written in the
// SQL both accept. Placeholders are $1, $2, … (SQLite reads them as named
// parameters numbered by first appearance, so each query uses them in
// order); timestamps are RFC 3339 text; "user" is always quoted.
package sqlstore

import (
	"context"
	"crypto/rand"
	"database/sql"
	"embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/writ-fleet/writ/ledger"
)

//go:embed migrations/*.sql
var migrations embed.FS

// Dialect is what differs between databases: how they report constraint
// violations.
type Dialect struct {
	Name         string
	IsUnique     func(error) bool
	IsForeignKey func(error) bool
	// ReportUptime, if set, is an uptime report as one statement, for a
	// database that can (PostgreSQL): parameters the boot ID, uptime
	// seconds, time (ts), used (JSON) and the node's ID; one row, of the
	// node's boot ID and last report before, and its boots after, -1 if
	// the report was not after the last. Else a transaction of three.
	ReportUptime string
}

// Store is a ledger store in a SQL database.
type Store struct {
	db *sql.DB
	d  Dialect
	// Prepared once: the uptime path runs for every report of every node,
	// and parsing its SQL each time cost more than running it.
	selBoot, updUptime, insBoot *sql.Stmt
	uptimeOne                   *sql.Stmt    // Dialect.ReportUptime, if set
	nonceSweep                  atomic.Int64 // the second expired nonces were last swept
}

var _ ledger.Store = (*Store)(nil)

// New returns the store over db and applies pending migrations.
func New(ctx context.Context, db *sql.DB, d Dialect) (*Store, error) {
	s := &Store{db: db, d: d}
	if err := s.migrate(ctx); err != nil {
		return nil, err
	}
	var err error
	for _, p := range []struct {
		stmt **sql.Stmt
		sql  string
	}{
		{&s.selBoot, `SELECT boot_id, last_report FROM nodes WHERE id = $1`},
		{&s.updUptime, `UPDATE nodes SET boot_id = $1, uptime_seconds = $2, last_report = $3, used = $4, boots = boots + $5 WHERE id = $6 RETURNING boots`},
		{&s.insBoot, `INSERT INTO node_boots (node, boot_id, first_seen) VALUES ($1, $2, $3) ON CONFLICT (node, boot_id) DO NOTHING`},
	} {
		if *p.stmt, err = db.PrepareContext(ctx, p.sql); err != nil {
			return nil, fmt.Errorf("prepare: %w", err)
		}
	}
	if d.ReportUptime != "" {
		if s.uptimeOne, err = db.PrepareContext(ctx, d.ReportUptime); err != nil {
			return nil, fmt.Errorf("prepare: %w", err)
		}
	}
	return s, nil
}

// DB returns the database (for tests and benchmarks).
func (s *Store) DB() *sql.DB { return s.db }

// Close closes the database.
func (s *Store) Close() error {
	for _, st := range []*sql.Stmt{s.selBoot, s.updUptime, s.insBoot, s.uptimeOne} {
		if st != nil {
			st.Close()
		}
	}
	return s.db.Close()
}

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
		if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM schema_migrations WHERE version = $1`, v).Scan(&n); err != nil {
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
		if _, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)`, v, ts(time.Now())); err != nil {
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

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
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
	if _, err := tx.ExecContext(ctx, `INSERT INTO users (name, disabled, created_at) VALUES ($1, 0, $2)`, u.Name, ts(u.CreatedAt)); err != nil {
		if s.d.IsUnique(err) {
			return fmt.Errorf("create user %s: %w", u.Name, ledger.ErrExists)
		}
		return fmt.Errorf("create user: %w", err)
	}
	for site, role := range u.Roles {
		if _, err := tx.ExecContext(ctx, `INSERT INTO roles ("user", site, role) VALUES ($1, $2, $3)`, u.Name, site, role); err != nil {
			return fmt.Errorf("create user: role: %w", err)
		}
	}
	for _, k := range u.Keys {
		if _, err := tx.ExecContext(ctx, `INSERT INTO keys (id, "user", public_key, created_at) VALUES ($1, $2, $3, $4)`, k.ID, u.Name, k.PublicKey, ts(u.CreatedAt)); err != nil {
			if s.d.IsUnique(err) {
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
	err := s.db.QueryRowContext(ctx, `SELECT disabled, created_at FROM users WHERE name = $1`, name).Scan(&u.Disabled, &created)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("user %s: %w", name, ledger.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get user: %w", err)
	}
	u.CreatedAt = parseTS(created)
	rows, err := s.db.QueryContext(ctx, `SELECT site, role FROM roles WHERE "user" = $1`, name)
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
	keyRows, err := s.db.QueryContext(ctx, `SELECT id, public_key, created_at, revoked_at FROM keys WHERE "user" = $1 ORDER BY created_at, id`, name)
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
	res, err := s.db.ExecContext(ctx, `UPDATE users SET disabled = $1 WHERE name = $2`, b2i(disabled), name)
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
		_, err := s.db.ExecContext(ctx, `DELETE FROM roles WHERE "user" = $1 AND site = $2`, user, site)
		return err
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO roles ("user", site, role) VALUES ($1, $2, $3) ON CONFLICT ("user", site) DO UPDATE SET role = excluded.role`, user, site, role)
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
	_, err := s.db.ExecContext(ctx, `INSERT INTO keys (id, "user", public_key, created_at) VALUES ($1, $2, $3, $4)`, k.ID, k.User, k.PublicKey, ts(k.CreatedAt))
	switch {
	case err != nil && s.d.IsUnique(err):
		return fmt.Errorf("key %s: %w", k.ID, ledger.ErrExists)
	case err != nil && s.d.IsForeignKey(err):
		return fmt.Errorf("user %s: %w", k.User, ledger.ErrNotFound)
	case err != nil:
		return fmt.Errorf("add key: %w", err)
	}
	return nil
}

// GetKey returns a key by ID.
func (s *Store) GetKey(ctx context.Context, id string) (*ledger.Key, error) {
	var user string
	row := s.db.QueryRowContext(ctx, `SELECT id, public_key, created_at, revoked_at, "user" FROM keys WHERE id = $1`, id)
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
	res, err := s.db.ExecContext(ctx, `UPDATE keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2`, ts(at), id)
	return affected(res, err, "key "+id)
}

// PutSite creates or replaces a site.
func (s *Store) PutSite(ctx context.Context, site ledger.Site) error {
	roles, _ := json.Marshal(site.Policy.Roles)
	_, err := s.db.ExecContext(ctx, `INSERT INTO sites (name, supervisor_url, policy_roles, threshold, uptime_interval, script_memory) VALUES ($1, $2, $3, $4, $5, $6)
		ON CONFLICT (name) DO UPDATE SET supervisor_url = excluded.supervisor_url, policy_roles = excluded.policy_roles, threshold = excluded.threshold, uptime_interval = excluded.uptime_interval, script_memory = excluded.script_memory`,
		site.Name, site.SupervisorURL, string(roles), site.Policy.Threshold, int64(site.UptimeInterval), site.ScriptMemory)
	if err != nil {
		return fmt.Errorf("put site: %w", err)
	}
	return nil
}

const siteCols = `name, supervisor_url, policy_roles, threshold, uptime_interval, script_memory`

func scanSite(r scanner) (*ledger.Site, error) {
	var site ledger.Site
	var roles string
	var interval int64
	if err := r.Scan(&site.Name, &site.SupervisorURL, &roles, &site.Policy.Threshold, &interval, &site.ScriptMemory); err != nil {
		return nil, err
	}
	site.UptimeInterval = ledger.Seconds(interval)
	if err := json.Unmarshal([]byte(roles), &site.Policy.Roles); err != nil {
		return nil, fmt.Errorf("site %s: bad policy roles: %w", site.Name, err)
	}
	return &site, nil
}

// GetSite returns a site.
func (s *Store) GetSite(ctx context.Context, name string) (*ledger.Site, error) {
	site, err := scanSite(s.db.QueryRowContext(ctx, `SELECT `+siteCols+` FROM sites WHERE name = $1`, name))
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
	rows, err := s.db.QueryContext(ctx, `SELECT `+siteCols+` FROM sites ORDER BY name`)
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
		SELECT k.id, k.public_key, k."user", k.revoked_at IS NOT NULL, u.disabled,
		       COALESCE((SELECT role FROM roles r WHERE r."user" = k."user" AND r.site = $1),
		                (SELECT role FROM roles r WHERE r."user" = k."user" AND r.site = '*'))
		FROM keys k JOIN users u ON u.name = k."user"
		WHERE EXISTS (SELECT 1 FROM roles r WHERE r."user" = k."user" AND r.site IN ($1, '*'))
		ORDER BY k.id`, site)
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
	if err := rows.Err(); err != nil {
		return nil, err
	}
	rows.Close()
	// Revoked nodes: their runners stop taking the site's work.
	nrows, err := s.db.QueryContext(ctx, `SELECT id FROM nodes WHERE site = $1 AND revoked_at IS NOT NULL ORDER BY id`, site)
	if err != nil {
		return nil, fmt.Errorf("trust %s: %w", site, err)
	}
	defer nrows.Close()
	for nrows.Next() {
		var id string
		if err := nrows.Scan(&id); err != nil {
			return nil, err
		}
		t.RevokedNodes = append(t.RevokedNodes, id)
	}
	return t, nrows.Err()
}

// CreateToken stores an enrollment token (its secret only as a hash).
func (s *Store) CreateToken(ctx context.Context, t ledger.Token, secretHash string) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO enroll_tokens (id, site, secret_sha256, created_by, created_at, expires_at, max_uses) VALUES ($1, $2, $3, $4, $5, $6, $7)`,
		t.ID, t.Site, secretHash, t.CreatedBy, ts(t.CreatedAt), ts(t.ExpiresAt), t.MaxUses)
	if err != nil && s.d.IsUnique(err) {
		return fmt.Errorf("token %s: %w", t.ID, ledger.ErrExists)
	}
	if err != nil {
		return fmt.Errorf("create token: %w", err)
	}
	return nil
}

const tokenCols = `id, site, created_by, created_at, expires_at, revoked_at, max_uses, uses`

func scanToken(r scanner) (*ledger.Token, error) {
	var t ledger.Token
	var created, expires string
	var revoked sql.NullString
	if err := r.Scan(&t.ID, &t.Site, &t.CreatedBy, &created, &expires, &revoked, &t.MaxUses, &t.Uses); err != nil {
		return nil, err
	}
	t.CreatedAt, t.ExpiresAt = parseTS(created), parseTS(expires)
	if revoked.Valid {
		at := parseTS(revoked.String)
		t.RevokedAt = &at
	}
	return &t, nil
}

// ListTokens lists a site's tokens, newest first.
func (s *Store) ListTokens(ctx context.Context, site string) ([]ledger.Token, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+tokenCols+` FROM enroll_tokens WHERE site = $1 ORDER BY created_at DESC, id`, site)
	if err != nil {
		return nil, fmt.Errorf("list tokens: %w", err)
	}
	defer rows.Close()
	out := []ledger.Token{}
	for rows.Next() {
		t, err := scanToken(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, *t)
	}
	return out, rows.Err()
}

// RevokeToken revokes a token; revoking twice keeps the first time.
func (s *Store) RevokeToken(ctx context.Context, id string, at time.Time) error {
	res, err := s.db.ExecContext(ctx, `UPDATE enroll_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2`, ts(at), id)
	return affected(res, err, "token "+id)
}

// TokenBySecret finds a token by the hash of its secret.
func (s *Store) TokenBySecret(ctx context.Context, secretHash string) (*ledger.Token, error) {
	t, err := scanToken(s.db.QueryRowContext(ctx, `SELECT `+tokenCols+` FROM enroll_tokens WHERE secret_sha256 = $1`, secretHash))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("token: %w", ledger.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("token: %w", err)
	}
	return t, nil
}

// RegisterNode implements ledger.Store.
func (s *Store) RegisterNode(ctx context.Context, n ledger.Node, token string) (bool, error) {
	facts, _ := json.Marshal(n.Facts)
	capacity, _ := json.Marshal(n.Capacity)
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("register node: %w", err)
	}
	defer tx.Rollback()
	var site string
	var revoked sql.NullString
	err = tx.QueryRowContext(ctx, `SELECT site, revoked_at FROM nodes WHERE id = $1`, n.ID).Scan(&site, &revoked)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		if token != "" {
			// One use of the token, in the node's own transaction: two
			// nodes racing for a token's last use cannot both have it.
			res, err := tx.ExecContext(ctx, `UPDATE enroll_tokens SET uses = uses + 1 WHERE id = $1 AND (max_uses = 0 OR uses < max_uses)`, token)
			if err != nil {
				return false, fmt.Errorf("register node: %w", err)
			}
			if n, _ := res.RowsAffected(); n != 1 {
				return false, fmt.Errorf("token %s: %w", token, ledger.ErrTokenUsedUp)
			}
		}
		used, _ := json.Marshal(ledger.Capacity{})
		if _, err := tx.ExecContext(ctx, `INSERT INTO nodes (id, site, public_key, facts, capacity, used, registered_at) VALUES ($1, $2, $3, $4, $5, $6, $7)`,
			n.ID, n.Site, n.PublicKey, string(facts), string(capacity), string(used), ts(n.RegisteredAt)); err != nil {
			return false, fmt.Errorf("register node: %w", err)
		}
		return true, tx.Commit()
	case err != nil:
		return false, fmt.Errorf("register node: %w", err)
	case revoked.Valid:
		return false, fmt.Errorf("node %s: %w (since %s; a revoked node never comes back: give the machine a new key)", n.ID, ledger.ErrNodeRevoked, revoked.String)
	case site != n.Site:
		return false, fmt.Errorf("node %s is registered to site %s, not %s (a node key never moves between sites; make a new key): %w", n.ID, site, n.Site, ledger.ErrConflict)
	}
	if _, err := tx.ExecContext(ctx, `UPDATE nodes SET facts = $1, capacity = $2 WHERE id = $3`, string(facts), string(capacity), n.ID); err != nil {
		return false, fmt.Errorf("register node: %w", err)
	}
	return false, tx.Commit()
}

const nodeCols = `id, site, public_key, facts, capacity, used, registered_at, boot_id, uptime_seconds, last_report, boots, revoked_at`

func scanNode(r scanner) (*ledger.Node, error) {
	var n ledger.Node
	var facts, capacity, used, registered, last string
	var revoked sql.NullString
	if err := r.Scan(&n.ID, &n.Site, &n.PublicKey, &facts, &capacity, &used, &registered, &n.BootID, &n.UptimeSeconds, &last, &n.Boots, &revoked); err != nil {
		return nil, err
	}
	if revoked.Valid {
		at := parseTS(revoked.String)
		n.RevokedAt = &at
	}
	json.Unmarshal([]byte(facts), &n.Facts)
	json.Unmarshal([]byte(capacity), &n.Capacity)
	json.Unmarshal([]byte(used), &n.Used)
	n.RegisteredAt = parseTS(registered)
	if last != "" {
		n.LastReport = parseTS(last)
	}
	return &n, nil
}

// RevokeNode implements ledger.Store.
func (s *Store) RevokeNode(ctx context.Context, id string, at time.Time) error {
	res, err := s.db.ExecContext(ctx, `UPDATE nodes SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2`, ts(at), id)
	return affected(res, err, "node "+id)
}

// GetNode implements ledger.Store.
func (s *Store) GetNode(ctx context.Context, id string) (*ledger.Node, error) {
	n, err := scanNode(s.db.QueryRowContext(ctx, `SELECT `+nodeCols+` FROM nodes WHERE id = $1`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("node %s: %w", id, ledger.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get node: %w", err)
	}
	return n, nil
}

// ListNodes implements ledger.Store.
func (s *Store) ListNodes(ctx context.Context, site string) ([]ledger.Node, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+nodeCols+` FROM nodes WHERE $1 = '' OR site = $1 ORDER BY site, id`, site)
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	defer rows.Close()
	out := []ledger.Node{}
	for rows.Next() {
		n, err := scanNode(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, *n)
	}
	return out, rows.Err()
}

// ReportUptime implements ledger.Store: one read and one update (plus a
// boots row when the boot ID is new) in one transaction.
func (s *Store) ReportUptime(ctx context.Context, id string, u ledger.Uptime) (bool, int64, error) {
	used, _ := json.Marshal(u.Used)
	if s.uptimeOne != nil {
		// One round trip and one commit: at a fleet's report rate the
		// transaction's four round trips were what the tail waited on.
		var boot, last string
		var boots int64
		err := s.uptimeOne.QueryRowContext(ctx, u.BootID, u.UptimeSeconds, ts(u.At), string(used), id).Scan(&boot, &last, &boots)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			return false, 0, fmt.Errorf("node %s: %w", id, ledger.ErrNotFound)
		case err != nil:
			return false, 0, fmt.Errorf("uptime: %w", err)
		case boots < 0:
			return false, 0, fmt.Errorf("node %s: report at %s, last at %s: %w", id, ts(u.At), last, ledger.ErrStaleReport)
		}
		return boot != u.BootID && boot != "", boots, nil
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return false, 0, fmt.Errorf("uptime: %w", err)
	}
	defer tx.Rollback()
	var boot, last string
	err = tx.StmtContext(ctx, s.selBoot).QueryRowContext(ctx, id).Scan(&boot, &last)
	if errors.Is(err, sql.ErrNoRows) {
		return false, 0, fmt.Errorf("node %s: %w", id, ledger.ErrNotFound)
	}
	if err != nil {
		return false, 0, fmt.Errorf("uptime: %w", err)
	}
	if last != "" && !u.At.After(parseTS(last)) {
		return false, 0, fmt.Errorf("node %s: report at %s, last at %s: %w", id, ts(u.At), last, ledger.ErrStaleReport)
	}
	newBoot := boot != u.BootID
	if newBoot {
		if _, err := tx.StmtContext(ctx, s.insBoot).ExecContext(ctx, id, u.BootID, ts(u.At)); err != nil {
			return false, 0, fmt.Errorf("uptime: %w", err)
		}
	}
	var boots int64
	if err := tx.StmtContext(ctx, s.updUptime).QueryRowContext(ctx, u.BootID, u.UptimeSeconds, ts(u.At), string(used), b2i(newBoot), id).Scan(&boots); err != nil {
		return false, 0, fmt.Errorf("uptime: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return false, 0, fmt.Errorf("uptime: %w", err)
	}
	// The first boot is not a restart.
	return newBoot && boot != "", boots, nil
}

// AddAudit implements ledger.Store.
func (s *Store) AddAudit(ctx context.Context, e ledger.AuditEntry) error {
	if e.ID == "" {
		var b [6]byte
		rand.Read(b[:])
		e.ID = fmt.Sprintf("%020d-%s", e.At.UnixNano(), hex.EncodeToString(b[:]))
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO audit (id, at, actor, op, target, detail) VALUES ($1, $2, $3, $4, $5, $6)`,
		e.ID, ts(e.At), e.Actor, e.Op, e.Target, e.Detail)
	if err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	return nil
}

// ListAudit returns the newest entries first.
func (s *Store) ListAudit(ctx context.Context, limit int) ([]ledger.AuditEntry, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, at, actor, op, target, detail FROM audit ORDER BY id DESC LIMIT $1`, limit)
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	defer rows.Close()
	out := []ledger.AuditEntry{}
	for rows.Next() {
		var e ledger.AuditEntry
		var at string
		if err := rows.Scan(&e.ID, &at, &e.Actor, &e.Op, &e.Target, &e.Detail); err != nil {
			return nil, err
		}
		e.At = parseTS(at)
		out = append(out, e)
	}
	return out, rows.Err()
}

// UseNonce records a signed request's nonce until expires and reports
// whether it was new (or its earlier use had expired): the replay guard
// every ledger process on this store shares (httpsig.NonceStore). Expired
// nonces are swept at most once a second.
func (s *Store) UseNonce(ctx context.Context, nonce string, now, expires time.Time) (bool, error) {
	res, err := s.db.ExecContext(ctx, `INSERT INTO request_nonces (nonce, expires_ms) VALUES ($1, $2)
ON CONFLICT (nonce) DO UPDATE SET expires_ms = excluded.expires_ms WHERE request_nonces.expires_ms < $3`,
		nonce, expires.UnixMilli(), now.UnixMilli())
	if err != nil {
		return false, fmt.Errorf("nonce: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("nonce: %w", err)
	}
	if sweep := now.Unix(); s.nonceSweep.Swap(sweep) != sweep {
		if _, err := s.db.ExecContext(ctx, `DELETE FROM request_nonces WHERE expires_ms < $1`, now.UnixMilli()); err != nil {
			return false, fmt.Errorf("nonce sweep: %w", err)
		}
	}
	return n == 1, nil
}

-- Users, their keys and per-site roles, and sites with their signing policy.
CREATE TABLE users (
    name       TEXT PRIMARY KEY,
    disabled   INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);

CREATE TABLE keys (
    id         TEXT PRIMARY KEY,          -- OpenSSH SHA256 fingerprint
    "user"     TEXT NOT NULL REFERENCES users(name),
    public_key TEXT NOT NULL,             -- authorized_keys line
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE INDEX keys_user ON keys("user");

CREATE TABLE roles (
    "user" TEXT NOT NULL REFERENCES users(name),
    site TEXT NOT NULL,                   -- a site name, or '*' for every site
    role TEXT NOT NULL,
    PRIMARY KEY ("user", site)
);

CREATE TABLE sites (
    name           TEXT PRIMARY KEY,
    supervisor_url TEXT NOT NULL,
    policy_roles   TEXT NOT NULL,         -- JSON array of roles that may sign
    threshold      INTEGER NOT NULL
);

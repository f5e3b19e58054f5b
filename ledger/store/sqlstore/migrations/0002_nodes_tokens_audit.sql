-- Nodes, enrollment tokens, boots, the admin audit log, and each site's
-- uptime interval.
ALTER TABLE sites ADD COLUMN uptime_interval BIGINT NOT NULL DEFAULT 0;

CREATE TABLE enroll_tokens (
    id            TEXT PRIMARY KEY,
    site          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_by    TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    expires_at    TEXT NOT NULL,
    revoked_at    TEXT
);
CREATE INDEX enroll_tokens_site ON enroll_tokens(site);

CREATE TABLE nodes (
    id             TEXT PRIMARY KEY,     -- derived from the public key
    site           TEXT NOT NULL,
    public_key     TEXT NOT NULL,
    facts          TEXT NOT NULL,        -- JSON
    capacity       TEXT NOT NULL,        -- JSON
    used           TEXT NOT NULL,        -- JSON, from the last report
    registered_at  TEXT NOT NULL,
    boot_id        TEXT NOT NULL DEFAULT '',
    uptime_seconds BIGINT NOT NULL DEFAULT 0,
    last_report    TEXT NOT NULL DEFAULT '',
    boots          BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX nodes_site ON nodes(site);

-- One row per boot of a node: restarts, compactly (the latest report lives
-- in nodes).
CREATE TABLE node_boots (
    node       TEXT NOT NULL,
    boot_id    TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    PRIMARY KEY (node, boot_id)
);

CREATE TABLE audit (
    id     TEXT PRIMARY KEY,             -- time-ordered
    at     TEXT NOT NULL,
    actor  TEXT NOT NULL,
    op     TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_at ON audit(at);

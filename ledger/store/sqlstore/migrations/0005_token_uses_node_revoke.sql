-- Enrollment tokens enroll at most max_uses nodes (0: tokens made before
-- uses were counted, unlimited); a revoked node's reports and
-- registrations are refused.
ALTER TABLE enroll_tokens ADD COLUMN max_uses BIGINT NOT NULL DEFAULT 0;
ALTER TABLE enroll_tokens ADD COLUMN uses BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN revoked_at TEXT;

-- Nonces of signed requests, kept until they expire, so a replayed request
-- is refused by every ledger process on this store and after a restart.
CREATE TABLE request_nonces (
    nonce      TEXT PRIMARY KEY,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX request_nonces_expires ON request_nonces (expires_ms);

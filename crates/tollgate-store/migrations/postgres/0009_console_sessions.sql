-- Console sessions, kept by the SHA-256 of the cookie's secret so a copy of the store signs no
-- one in. key_id is the master key signed in with; NULL for the operator.
CREATE TABLE console_sessions (
    id_hash BYTEA PRIMARY KEY,
    key_id TEXT,
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL
);
CREATE INDEX console_sessions_last_seen ON console_sessions (last_seen_at);

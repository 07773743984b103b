-- Idempotency keys: one row per (scope, key). While a request runs the row is 'in_flight',
-- locked for its owner until lease_until; a final outcome makes it 'completed' with the response
-- kept for replay (body NULL: the outcome is known but cannot be replayed). Rows are forgotten at
-- expires_at.
CREATE TABLE idempotency_keys (
    scope        TEXT NOT NULL,
    key          TEXT NOT NULL,
    fingerprint  BLOB NOT NULL,
    owner        TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('in_flight', 'completed')),
    lease_until  INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    status       INTEGER,
    headers      TEXT,
    body         BLOB,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at);

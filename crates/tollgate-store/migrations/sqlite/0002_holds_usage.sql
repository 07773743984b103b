-- Holds, the usage log, per-key spend caps, and what the ledger needs to point at them.

-- Cached balance of the account's holds ledger account (credit reserved by pending holds).
ALTER TABLE wallets ADD COLUMN held_nanos INTEGER NOT NULL DEFAULT 0 CHECK (held_nanos >= 0);

ALTER TABLE api_keys ADD COLUMN monthly_spend_cap_nanos INTEGER CHECK (monthly_spend_cap_nanos >= 0);

-- What a transfer belongs to: a hold id, or a grant's reference.
ALTER TABLE ledger_transfers ADD COLUMN reference TEXT NOT NULL DEFAULT '';

CREATE TABLE holds (
    id             TEXT PRIMARY KEY,
    account_id     TEXT NOT NULL REFERENCES accounts (id),
    key_id         TEXT,
    source         TEXT NOT NULL CHECK (source IN ('request', 'api')),
    request_id     TEXT,
    amount_nanos   INTEGER NOT NULL CHECK (amount_nanos >= 0),
    charged_nanos  INTEGER NOT NULL DEFAULT 0 CHECK (charged_nanos >= 0 AND charged_nanos <= amount_nanos),
    status         TEXT NOT NULL CHECK (status IN ('pending', 'settled', 'released', 'expired')),
    metadata       TEXT NOT NULL DEFAULT '{}',
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    resolved_at    INTEGER,
    CHECK ((status = 'pending') = (resolved_at IS NULL))
);
CREATE INDEX holds_pending ON holds (status) WHERE status = 'pending';
CREATE INDEX holds_by_key_resolved ON holds (key_id, resolved_at);

-- A hold resolves exactly once: only a pending hold may change, and only to resolved.
CREATE TRIGGER holds_resolve_once BEFORE UPDATE ON holds
WHEN OLD.status <> 'pending'
BEGIN SELECT RAISE(ABORT, 'a resolved hold cannot change'); END;

-- One row per authenticated data-plane request.
CREATE TABLE requests (
    request_id           TEXT PRIMARY KEY,
    client_request_id    TEXT,
    account_id           TEXT NOT NULL,
    key_id               TEXT NOT NULL,
    route                TEXT NOT NULL,
    model                TEXT,
    method               TEXT NOT NULL,
    path                 TEXT NOT NULL,
    status               INTEGER NOT NULL,
    upstream_status      INTEGER,
    units                TEXT,
    input_tokens         INTEGER,
    cached_input_tokens  INTEGER,
    output_tokens        INTEGER,
    cost_nanos           INTEGER NOT NULL,
    hold_nanos           INTEGER NOT NULL,
    hold_id              TEXT,
    billing_status       TEXT NOT NULL,
    latency_ms           INTEGER NOT NULL,
    error_code           TEXT,
    created_at           INTEGER NOT NULL,
    completed_at         INTEGER NOT NULL
);
CREATE INDEX requests_by_account ON requests (account_id, request_id);
CREATE INDEX requests_by_time ON requests (created_at);

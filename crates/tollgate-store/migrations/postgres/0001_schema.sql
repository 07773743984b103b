-- Tollgate's schema on PostgreSQL: the same tables and representation as the SQLite schema
-- (text ids, integer nano-units, Unix-millisecond times, JSON as text, hashes as bytes), so both
-- backends decode the same rows. Ids sort by byte (COLLATE "C"): a ULID's order is its creation
-- order, whatever the database's locale.

CREATE TABLE accounts (
    id           TEXT COLLATE "C" PRIMARY KEY,
    name         TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at   BIGINT NOT NULL,
    max_keys     BIGINT CHECK (max_keys >= 0),
    rate_limits  TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE api_keys (
    id                       TEXT COLLATE "C" PRIMARY KEY,
    account_id               TEXT COLLATE "C" NOT NULL REFERENCES accounts (id),
    key_hash                 BYTEA NOT NULL UNIQUE,  -- SHA-256 of the plaintext, never the plaintext
    display_prefix           TEXT NOT NULL,
    kind                     TEXT NOT NULL CHECK (kind IN ('master', 'usage')),
    status                   TEXT NOT NULL CHECK (status IN ('active', 'inactive', 'revoked')),
    name                     TEXT NOT NULL,
    scopes                   TEXT NOT NULL,          -- JSON array of strings
    allowed_ips              TEXT NOT NULL DEFAULT '[]',
    expires_at               BIGINT,
    monthly_spend_cap_nanos  BIGINT CHECK (monthly_spend_cap_nanos >= 0),
    rate_limits              TEXT NOT NULL DEFAULT '{}',
    created_at               BIGINT NOT NULL,
    revoked_at               BIGINT
);
CREATE INDEX api_keys_by_account ON api_keys (account_id, id);

CREATE TABLE retired_key_secrets (
    key_hash    BYTEA PRIMARY KEY,
    key_id      TEXT COLLATE "C" NOT NULL REFERENCES api_keys (id),
    expires_at  BIGINT NOT NULL,
    retired_at  BIGINT NOT NULL
);
CREATE INDEX retired_key_secrets_by_key ON retired_key_secrets (key_id);

-- Cached balances; always equal to the sums of the account's wallet and holds ledger entries.
CREATE TABLE wallets (
    account_id     TEXT COLLATE "C" PRIMARY KEY REFERENCES accounts (id),
    balance_nanos  BIGINT NOT NULL CHECK (balance_nanos >= 0),
    held_nanos     BIGINT NOT NULL DEFAULT 0 CHECK (held_nanos >= 0)
);

-- Append-only double-entry transfers: the sum of all entries is zero by construction.
CREATE TABLE ledger_transfers (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    debit_account   TEXT COLLATE "C" NOT NULL,
    credit_account  TEXT COLLATE "C" NOT NULL,
    amount_nanos    BIGINT NOT NULL CHECK (amount_nanos > 0),
    kind            TEXT NOT NULL,
    account_id      TEXT COLLATE "C" NOT NULL REFERENCES accounts (id),
    memo            TEXT NOT NULL DEFAULT '',
    reference       TEXT NOT NULL DEFAULT '',
    created_at      BIGINT NOT NULL,
    CHECK (debit_account <> credit_account)
);
CREATE INDEX ledger_transfers_by_account ON ledger_transfers (account_id, id);

CREATE FUNCTION ledger_transfers_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_transfers is append-only';
END;
$$;
CREATE TRIGGER ledger_transfers_no_change BEFORE UPDATE OR DELETE ON ledger_transfers
FOR EACH ROW EXECUTE FUNCTION ledger_transfers_append_only();

CREATE TABLE holds (
    id             TEXT COLLATE "C" PRIMARY KEY,
    account_id     TEXT COLLATE "C" NOT NULL REFERENCES accounts (id),
    key_id         TEXT COLLATE "C",
    source         TEXT NOT NULL CHECK (source IN ('request', 'api')),
    request_id     TEXT,
    amount_nanos   BIGINT NOT NULL CHECK (amount_nanos >= 0),
    charged_nanos  BIGINT NOT NULL DEFAULT 0 CHECK (charged_nanos >= 0 AND charged_nanos <= amount_nanos),
    status         TEXT NOT NULL CHECK (status IN ('pending', 'settled', 'released', 'expired')),
    metadata       TEXT NOT NULL DEFAULT '{}',
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    resolved_at    BIGINT,
    CHECK ((status = 'pending') = (resolved_at IS NULL))
);
CREATE INDEX holds_pending ON holds (status) WHERE status = 'pending';
CREATE INDEX holds_by_key_resolved ON holds (key_id, resolved_at);

-- A hold resolves exactly once: only a pending hold may change.
CREATE FUNCTION holds_resolve_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status <> 'pending' THEN
        RAISE EXCEPTION 'a resolved hold cannot change';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER holds_resolve_once BEFORE UPDATE ON holds
FOR EACH ROW EXECUTE FUNCTION holds_resolve_once();

-- One row per authenticated data-plane request.
CREATE TABLE requests (
    request_id           TEXT COLLATE "C" PRIMARY KEY,
    client_request_id    TEXT,
    account_id           TEXT COLLATE "C" NOT NULL,
    key_id               TEXT COLLATE "C" NOT NULL,
    route                TEXT NOT NULL,
    model                TEXT,
    method               TEXT NOT NULL,
    path                 TEXT NOT NULL,
    status               BIGINT NOT NULL,
    upstream_status      BIGINT,
    units                TEXT,
    input_tokens         BIGINT,
    cached_input_tokens  BIGINT,
    output_tokens        BIGINT,
    cost_nanos           BIGINT NOT NULL,
    hold_nanos           BIGINT NOT NULL,
    hold_id              TEXT,
    billing_status       TEXT NOT NULL,
    latency_ms           BIGINT NOT NULL,
    error_code           TEXT,
    created_at           BIGINT NOT NULL,
    completed_at         BIGINT NOT NULL
);
CREATE INDEX requests_by_account ON requests (account_id, request_id);
CREATE INDEX requests_by_time ON requests (created_at);

-- Idempotency keys: 'in_flight' while a request runs (its owner holds the lease), 'completed'
-- with the response kept for replay; forgotten at expires_at.
CREATE TABLE idempotency_keys (
    scope        TEXT NOT NULL,
    key          TEXT NOT NULL,
    fingerprint  BYTEA NOT NULL,
    owner        TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('in_flight', 'completed')),
    lease_until  BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    status       BIGINT,
    headers      TEXT,
    body         BYTEA,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at);

-- The hash-chained audit log and its head (the last entry's number and hash).
CREATE TABLE audit_log (
    seq         BIGINT PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    before      TEXT,
    after       TEXT,
    prev_hash   BYTEA NOT NULL,
    hash        BYTEA NOT NULL
);

CREATE TABLE audit_head (
    id    BIGINT PRIMARY KEY CHECK (id = 1),
    seq   BIGINT NOT NULL,
    hash  BYTEA NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, decode(repeat('00', 32), 'hex'));

-- An account's plan and where its subscription stands (see docs/billing.md#plans).
CREATE TABLE subscriptions (
    account_id TEXT PRIMARY KEY REFERENCES accounts (id),
    plan TEXT NOT NULL,
    status TEXT NOT NULL,
    since INTEGER NOT NULL,
    started_at INTEGER NOT NULL
);

-- Buckets of included units: a plan allowance's for one period ('<allowance>@<period start>'),
-- created by the first call of the period, and credit packs ('pack:<id>').
CREATE TABLE unit_buckets (
    account_id TEXT NOT NULL REFERENCES accounts (id),
    bucket TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('allowance', 'pack')),
    meter TEXT NOT NULL,
    routes TEXT,
    granted INTEGER NOT NULL CHECK (granted >= 0),
    -- What the plan granted the bucket (rollover aside): an upgrade raises the grant past it.
    base INTEGER NOT NULL DEFAULT 0,
    used INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
    held INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0),
    starts_at INTEGER NOT NULL,
    ends_at INTEGER NOT NULL,
    CHECK (used + held <= granted),
    PRIMARY KEY (account_id, bucket)
) WITHOUT ROWID;

-- What calls in progress hold, by request, in draw order; returned at settle or expiry.
CREATE TABLE unit_draws (
    request_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    account_id TEXT NOT NULL,
    bucket TEXT NOT NULL,
    units INTEGER NOT NULL CHECK (units > 0),
    expires_at INTEGER NOT NULL,
    -- A window's draw: it uses what the allowance's draw uses.
    mirror INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (request_id, position)
);
CREATE INDEX unit_draws_by_expiry ON unit_draws (expires_at);

-- Every movement of units between a bucket's states (grant, hold, use, return, expire, reset,
-- carry: unused units a period's bucket passes to the next by rollover).
CREATE TABLE unit_entries (
    id INTEGER PRIMARY KEY,
    account_id TEXT NOT NULL,
    bucket TEXT NOT NULL,
    kind TEXT NOT NULL,
    units INTEGER NOT NULL CHECK (units >= 0),
    reference TEXT,
    at INTEGER NOT NULL
);
CREATE INDEX unit_entries_by_bucket ON unit_entries (account_id, bucket);
-- A manual reset happens once per reference.
CREATE UNIQUE INDEX unit_entries_reset ON unit_entries (account_id, reference)
    WHERE kind = 'reset';

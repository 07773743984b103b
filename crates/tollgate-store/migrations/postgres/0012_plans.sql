-- An account's plan and where its subscription stands (see docs/billing.md#plans).
CREATE TABLE subscriptions (
    account_id TEXT COLLATE "C" PRIMARY KEY REFERENCES accounts (id),
    plan TEXT NOT NULL,
    status TEXT NOT NULL,
    since BIGINT NOT NULL,
    started_at BIGINT NOT NULL
);

-- The subscription decides whether the account's keys may call: a change is announced as a
-- change of the account, so every node drops what it cached of it.
CREATE FUNCTION tollgate_announce_subscription_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollgate_changes', 'account:' || NEW.account_id);
    RETURN NULL;
END;
$$;
CREATE TRIGGER subscriptions_announce AFTER INSERT OR UPDATE ON subscriptions
FOR EACH ROW EXECUTE FUNCTION tollgate_announce_subscription_change();

-- Buckets of included units: a plan allowance's for one period ('<allowance>@<period start>'),
-- created by the first call of the period, and credit packs ('pack:<id>').
CREATE TABLE unit_buckets (
    account_id TEXT COLLATE "C" NOT NULL REFERENCES accounts (id),
    bucket TEXT COLLATE "C" NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('allowance', 'pack')),
    meter TEXT NOT NULL,
    routes TEXT,
    granted BIGINT NOT NULL CHECK (granted >= 0),
    -- What the plan granted the bucket (rollover aside): an upgrade raises the grant past it.
    base BIGINT NOT NULL DEFAULT 0,
    used BIGINT NOT NULL DEFAULT 0 CHECK (used >= 0),
    held BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0),
    starts_at BIGINT NOT NULL,
    ends_at BIGINT NOT NULL,
    CHECK (used + held <= granted),
    PRIMARY KEY (account_id, bucket)
);

-- What calls in progress hold, by request, in draw order; returned at settle or expiry.
CREATE TABLE unit_draws (
    request_id TEXT COLLATE "C" NOT NULL,
    position BIGINT NOT NULL,
    account_id TEXT COLLATE "C" NOT NULL,
    bucket TEXT COLLATE "C" NOT NULL,
    units BIGINT NOT NULL CHECK (units > 0),
    expires_at BIGINT NOT NULL,
    -- A window's draw: it uses what the allowance's draw uses.
    mirror BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (request_id, position)
);
CREATE INDEX unit_draws_by_expiry ON unit_draws (expires_at);

-- Every movement of units between a bucket's states (grant, hold, use, return, expire, reset,
-- carry: unused units a period's bucket passes to the next by rollover).
CREATE TABLE unit_entries (
    id BIGSERIAL PRIMARY KEY,
    account_id TEXT COLLATE "C" NOT NULL,
    bucket TEXT COLLATE "C" NOT NULL,
    kind TEXT NOT NULL,
    units BIGINT NOT NULL CHECK (units >= 0),
    reference TEXT,
    at BIGINT NOT NULL
);
CREATE INDEX unit_entries_by_bucket ON unit_entries (account_id, bucket);
-- A manual reset happens once per reference.
CREATE UNIQUE INDEX unit_entries_reset ON unit_entries (account_id, reference)
    WHERE kind = 'reset';

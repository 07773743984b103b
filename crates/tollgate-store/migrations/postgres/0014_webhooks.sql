-- Webhooks: the endpoints an account receives events at, the events (an outbox: written in the
-- transaction of the change that caused them), one delivery per (endpoint, event), and the
-- crossings that make a threshold fire once per episode. See docs/webhooks.md.
CREATE TABLE webhook_endpoints (
    id               TEXT COLLATE "C" PRIMARY KEY,
    account_id       TEXT COLLATE "C" NOT NULL REFERENCES accounts (id),
    url              TEXT NOT NULL,
    description      TEXT NOT NULL,
    event_types      TEXT NOT NULL,               -- JSON array of event type names, or ["*"]
    enabled          BIGINT NOT NULL,            -- 1 or 0
    disabled_reason  TEXT,
    secret           TEXT NOT NULL,               -- whsec_...: it signs, so it is kept as is
    previous_secret  TEXT,                        -- the one before a rotation, until previous_until
    previous_until   BIGINT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
CREATE INDEX webhook_endpoints_by_account ON webhook_endpoints (account_id, id);

CREATE TABLE webhook_events (
    id          TEXT COLLATE "C" PRIMARY KEY,                 -- msg_...: the webhook-id of every attempt
    account_id  TEXT COLLATE "C" NOT NULL,
    type        TEXT NOT NULL,
    body        TEXT NOT NULL,                    -- the exact bytes every attempt sends
    created_at  BIGINT NOT NULL,
    fanned_out  BIGINT NOT NULL DEFAULT 0        -- 1 once a delivery exists for each endpoint
);
CREATE INDEX webhook_events_waiting ON webhook_events (id) WHERE fanned_out = 0;

CREATE TABLE webhook_deliveries (
    endpoint_id   TEXT COLLATE "C" NOT NULL,
    event_id      TEXT COLLATE "C" NOT NULL REFERENCES webhook_events (id),
    status        TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts      BIGINT NOT NULL,
    next_at       BIGINT NOT NULL,
    leased_until  BIGINT NOT NULL,               -- a worker's claim on the attempt in flight
    last_status   BIGINT,
    last_error    TEXT,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (endpoint_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_at) WHERE status = 'pending';

-- A row per threshold crossed and not yet recovered from: inserted once (the primary key
-- decides between concurrent crossings, on every node), deleted when the value recovers.
CREATE TABLE notify_crossings (
    subject     TEXT COLLATE "C" NOT NULL,                    -- acct_... or key_...
    kind        TEXT NOT NULL,                    -- balance.low, balance.depleted, ...
    period      TEXT NOT NULL,                    -- '' or the period the threshold belongs to
    currency    TEXT NOT NULL,
    crossed_at  BIGINT NOT NULL,
    PRIMARY KEY (subject, kind, period)
);

CREATE TABLE balance_alerts (
    account_id  TEXT COLLATE "C" PRIMARY KEY REFERENCES accounts (id),
    low_nanos   BIGINT NOT NULL CHECK (low_nanos > 0),
    currency    TEXT NOT NULL
);

-- Keys that expire soon, for key.expiring.
CREATE INDEX api_keys_expiring ON api_keys (expires_at) WHERE expires_at IS NOT NULL;

-- The deployment's currency, recorded by the server at start, for the events the store writes.
CREATE TABLE notify_settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

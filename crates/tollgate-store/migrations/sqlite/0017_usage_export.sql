-- Usage export: charged usage in commit order (the log the exporter reads), each sink's cursor,
-- the records a sink could not take (parked: no customer mapping yet, too old, refused), and
-- the accounts' customer ids in each sink. See docs/export.md.
--
-- One writer at a time commits to SQLite, so AUTOINCREMENT numbers rows in commit order: a
-- reader that has seen a seq has seen every seq below it.
CREATE TABLE usage_exports (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id           TEXT NOT NULL,               -- unique: `requests`' key, in the same commit
    account_id           TEXT NOT NULL,
    key_id               TEXT NOT NULL,
    route                TEXT NOT NULL,
    model                TEXT,
    billing_status       TEXT NOT NULL CHECK (billing_status IN ('settled', 'partial', 'estimated')),
    cost_nanos           INTEGER NOT NULL CHECK (cost_nanos >= 0),
    input_tokens         INTEGER NOT NULL,
    cached_input_tokens  INTEGER NOT NULL,
    output_tokens        INTEGER NOT NULL,
    at                   INTEGER NOT NULL          -- when the call's usage was final
);
CREATE INDEX usage_exports_by_time ON usage_exports (at);

CREATE TABLE export_cursors (
    sink        TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,                  -- every record up to here is acknowledged or parked
    updated_at  INTEGER NOT NULL
);

CREATE TABLE export_parked (
    sink       TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    reason     TEXT NOT NULL CHECK (reason IN ('unmapped', 'too_old', 'rejected')),
    detail     TEXT NOT NULL,
    parked_at  INTEGER NOT NULL,
    PRIMARY KEY (sink, seq)
);
CREATE INDEX export_parked_by_reason ON export_parked (sink, reason, seq);

CREATE TABLE export_customers (
    account_id  TEXT NOT NULL,
    sink        TEXT NOT NULL,
    customer    TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (account_id, sink)
);

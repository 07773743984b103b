-- Usage export: charged usage in commit order (the log the exporter reads), each sink's cursor,
-- the records a sink could not take (parked: no customer mapping yet, too old, refused), and
-- the accounts' customer ids in each sink. See docs/export.md.
--
-- A sequence would number rows in the order transactions ask, not the order they commit, and a
-- reader could pass a number whose transaction is still open. So a batch takes its numbers from
-- one counter row as its last statement: the row stays locked until the batch commits, and
-- numbers are handed out in commit order.
CREATE TABLE export_counter (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    last  BIGINT NOT NULL
);
INSERT INTO export_counter (id, last) VALUES (1, 0);

CREATE TABLE usage_exports (
    seq                  BIGINT PRIMARY KEY,
    request_id           TEXT COLLATE "C" NOT NULL UNIQUE,
    account_id           TEXT COLLATE "C" NOT NULL,
    key_id               TEXT COLLATE "C" NOT NULL,
    route                TEXT NOT NULL,
    model                TEXT,
    billing_status       TEXT NOT NULL CHECK (billing_status IN ('settled', 'partial', 'estimated')),
    cost_nanos           BIGINT NOT NULL CHECK (cost_nanos >= 0),
    input_tokens         BIGINT NOT NULL,
    cached_input_tokens  BIGINT NOT NULL,
    output_tokens        BIGINT NOT NULL,
    at                   BIGINT NOT NULL
);
CREATE INDEX usage_exports_by_time ON usage_exports (at);

CREATE TABLE export_cursors (
    sink        TEXT COLLATE "C" PRIMARY KEY,
    seq         BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE export_parked (
    sink       TEXT COLLATE "C" NOT NULL,
    seq        BIGINT NOT NULL,
    reason     TEXT NOT NULL CHECK (reason IN ('unmapped', 'too_old', 'rejected')),
    detail     TEXT NOT NULL,
    parked_at  BIGINT NOT NULL,
    PRIMARY KEY (sink, seq)
);
CREATE INDEX export_parked_by_reason ON export_parked (sink, reason, seq);

CREATE TABLE export_customers (
    account_id  TEXT COLLATE "C" NOT NULL,
    sink        TEXT COLLATE "C" NOT NULL,
    customer    TEXT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (account_id, sink)
);

-- Usage export: charged usage in commit order (the log the exporter reads), each sink's cursor,
-- the records a sink could not take (parked: no customer mapping yet, too old, refused), and
-- the accounts' customer ids in each sink. See docs/export.md.
--
-- Nodes commit concurrently, so a number taken at insert would follow the order transactions
-- ask, not the order they commit: a reader could pass a number whose transaction is still open
-- and never send that record. So a row is inserted unnumbered, and numbered only once it is
-- visible (committed), by the exporter, under a lock that makes numberings follow one another:
-- every number handed out later is higher, and a row committed later is numbered later. The
-- data plane's commits take no lock for this.
CREATE SEQUENCE usage_export_seq;

CREATE TABLE usage_exports (
    request_id           TEXT COLLATE "C" PRIMARY KEY,
    seq                  BIGINT UNIQUE,               -- NULL until numbered (see above)
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
CREATE INDEX usage_exports_unnumbered ON usage_exports (at) WHERE seq IS NULL;

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

-- Every committed ledger batch, by its id. A connection can drop after COMMIT reached the server
-- but before its answer came back; the writer then retries the batch, which this table lets the
-- store recognise and skip instead of applying it twice. Rows older than a day are deleted by
-- the retention sweep.
CREATE TABLE ledger_batches (
    id            TEXT COLLATE "C" PRIMARY KEY,
    committed_at  BIGINT NOT NULL
);

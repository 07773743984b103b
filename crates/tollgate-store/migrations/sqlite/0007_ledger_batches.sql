-- Every committed ledger batch, by its id, so a batch retried after an unanswered commit is
-- recognised and not applied twice. Rows older than a day are deleted by the retention sweep.
CREATE TABLE ledger_batches (
    id            TEXT PRIMARY KEY,
    committed_at  INTEGER NOT NULL
);

-- A grant made with the caller's reference (stored as 'grant:<reference>') is applied once per
-- account: a retry after an answer that was lost cannot credit twice.
CREATE UNIQUE INDEX ledger_transfers_grant_reference ON ledger_transfers (account_id, reference)
    WHERE kind = 'grant' AND reference LIKE 'grant:%';

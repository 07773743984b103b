-- A plan's fee for a period is filed under 'plan:<period start>:<plan>' and paid once, whichever
-- node takes it.
CREATE UNIQUE INDEX ledger_transfers_plan_fee ON ledger_transfers (account_id, reference)
    WHERE reference LIKE 'plan:%';

-- A plan's fee for a period is filed under 'plan:<period start>:<plan>', a pack's purchase under
-- 'pack:<bucket>': each paid once, whichever node takes it.
CREATE UNIQUE INDEX ledger_transfers_plan_fee ON ledger_transfers (account_id, reference)
    WHERE reference LIKE 'plan:%' OR reference LIKE 'pack:%';

-- A card top-up that buys a credit pack (by its name in [[packs]]) once it is credited.
ALTER TABLE topups ADD COLUMN pack TEXT;

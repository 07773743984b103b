-- What an account owes: a refund or a dispute that took back credit the wallet had spent. The
-- wallet never goes below zero; new credit pays this first (a 'repay' transfer).
ALTER TABLE wallets ADD COLUMN debt_nanos INTEGER NOT NULL DEFAULT 0 CHECK (debt_nanos >= 0);

-- A payment's movements are filed under 'payment:<top-up id>:...' and applied once each.
CREATE UNIQUE INDEX ledger_transfers_payment ON ledger_transfers (account_id, reference, kind)
    WHERE reference LIKE 'payment:%';

-- Card top-ups, written before the payment provider is asked (see docs/billing.md).
CREATE TABLE topups (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    amount_nanos INTEGER NOT NULL CHECK (amount_nanos > 0),
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency TEXT NOT NULL,
    status TEXT NOT NULL,
    origin TEXT NOT NULL,
    checkout_session TEXT UNIQUE,
    checkout_url TEXT,
    payment_intent TEXT UNIQUE,
    -- A dispute of its payment: open, won or lost.
    dispute TEXT,
    review TEXT,
    failure TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX topups_by_account ON topups (account_id, id);

-- Every payment event received, by the provider's id: recorded before it is handled, marked
-- handled after. One about a payment not credited yet (a refund delivered first) waits, found
-- again by its top-up or its payment intent once the payment is credited.
CREATE TABLE payment_events (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    topup_id TEXT,
    payment_intent TEXT,
    payload TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    handled_at INTEGER,
    outcome TEXT
);
CREATE INDEX payment_events_waiting ON payment_events (topup_id) WHERE handled_at IS NULL;
CREATE INDEX payment_events_waiting_intent ON payment_events (payment_intent)
    WHERE handled_at IS NULL;

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
    -- An automatic top-up's key: the account and which of the month's it is, so nodes that see
    -- the same crossing start one top-up (and Stripe, given it as the idempotency key, one charge).
    auto_key TEXT UNIQUE,
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

-- Automatic top-up per account: below the threshold, buy the amount with the card saved by an
-- earlier checkout, at most max_per_month times a calendar month (UTC). A payment that needs the
-- customer turns it off, with the reason.
CREATE TABLE auto_topups (
    account_id TEXT PRIMARY KEY REFERENCES accounts (id),
    threshold_nanos INTEGER NOT NULL DEFAULT 0,
    amount_nanos INTEGER NOT NULL DEFAULT 0,
    max_per_month INTEGER NOT NULL DEFAULT 0,
    enabled INTEGER NOT NULL DEFAULT 0,
    disabled_reason TEXT,
    customer TEXT,
    payment_method TEXT,
    updated_at INTEGER NOT NULL
);

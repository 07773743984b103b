-- Accounts, API keys, wallets and the double-entry ledger.
-- Timestamps are Unix milliseconds (UTC); amounts are integer nano-units.

CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at  INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL REFERENCES accounts (id),
    key_hash        BLOB NOT NULL UNIQUE,      -- SHA-256 of the plaintext; the plaintext is never stored
    display_prefix  TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('master', 'usage')),
    status          TEXT NOT NULL CHECK (status IN ('active', 'inactive', 'revoked')),
    name            TEXT NOT NULL,
    scopes          TEXT NOT NULL,             -- JSON array of strings
    expires_at      INTEGER,
    created_at      INTEGER NOT NULL,
    revoked_at      INTEGER
);
CREATE INDEX api_keys_by_account ON api_keys (account_id, id);

-- Cached wallet balance; always equal to the sum of the account's wallet ledger entries.
CREATE TABLE wallets (
    account_id     TEXT PRIMARY KEY REFERENCES accounts (id),
    balance_nanos  INTEGER NOT NULL CHECK (balance_nanos >= 0)
);

-- Append-only: each row moves amount_nanos from debit_account to credit_account, so the sum
-- of all entries is zero by construction. Ledger account names: 'external', 'revenue',
-- 'wallet:<account id>', 'holds:<account id>'.
CREATE TABLE ledger_transfers (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    debit_account   TEXT NOT NULL,
    credit_account  TEXT NOT NULL,
    amount_nanos    INTEGER NOT NULL CHECK (amount_nanos > 0),
    kind            TEXT NOT NULL,
    account_id      TEXT NOT NULL REFERENCES accounts (id),
    memo            TEXT NOT NULL DEFAULT '',
    created_at      INTEGER NOT NULL,
    CHECK (debit_account <> credit_account)
);
CREATE INDEX ledger_transfers_by_account ON ledger_transfers (account_id, id);

CREATE TRIGGER ledger_transfers_no_update BEFORE UPDATE ON ledger_transfers
BEGIN SELECT RAISE(ABORT, 'ledger_transfers is append-only'); END;
CREATE TRIGGER ledger_transfers_no_delete BEFORE DELETE ON ledger_transfers
BEGIN SELECT RAISE(ABORT, 'ledger_transfers is append-only'); END;

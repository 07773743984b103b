-- Access control: IP allowlists, per-account key limits, and the secrets a roll replaced.

-- JSON array of CIDR strings; empty means any address.
ALTER TABLE api_keys ADD COLUMN allowed_ips TEXT NOT NULL DEFAULT '[]';

-- Overrides the configured keys-per-account limit; NULL means the configured default.
ALTER TABLE accounts ADD COLUMN max_keys INTEGER CHECK (max_keys >= 0);

-- A rolled key's previous secrets (SHA-256 only), each valid until its expires_at, after which
-- it answers key_revoked rather than invalid_api_key.
CREATE TABLE retired_key_secrets (
    key_hash    BLOB PRIMARY KEY,
    key_id      TEXT NOT NULL REFERENCES api_keys (id),
    expires_at  INTEGER NOT NULL,
    retired_at  INTEGER NOT NULL
);
CREATE INDEX retired_key_secrets_by_key ON retired_key_secrets (key_id);

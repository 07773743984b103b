-- Credit leases: the part of a wallet's balance one node may spend without asking the database.
-- An account's leases never sum to more than its balance_nanos: a lease is carved only from the
-- free balance while the wallet row is locked, and a node's ledger batches move its lease and the
-- balance together. A lease no longer renewed (its node stopped) is deleted by the other nodes,
-- which frees its credit. See docs/cluster.md.
CREATE TABLE wallet_leases (
    account_id    TEXT COLLATE "C" NOT NULL REFERENCES accounts (id),
    node_id       TEXT COLLATE "C" NOT NULL,
    amount_nanos  BIGINT NOT NULL CHECK (amount_nanos >= 0),
    renewed_at    BIGINT NOT NULL,
    PRIMARY KEY (account_id, node_id)
);
CREATE INDEX wallet_leases_by_node ON wallet_leases (node_id);
CREATE INDEX wallet_leases_by_renewal ON wallet_leases (renewed_at);

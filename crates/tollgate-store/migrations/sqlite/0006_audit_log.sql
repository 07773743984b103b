-- The audit log: every management change, hash-chained (see tollgate_core::audit). Entries are
-- only ever appended; the head row holds the last entry's number and hash, so entries cut from
-- the end are noticed too.
CREATE TABLE audit_log (
    seq         INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    before      TEXT,
    after       TEXT,
    prev_hash   BLOB NOT NULL,
    hash        BLOB NOT NULL
);

CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   INTEGER NOT NULL,
    hash  BLOB NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, zeroblob(32));

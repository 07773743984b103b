-- What a call's usage cost beyond its hold: the charge is capped at the hold, so this is what
-- the house did not collect. Non-zero marks a call whose hold was too small.
ALTER TABLE requests ADD COLUMN uncovered_nanos BIGINT NOT NULL DEFAULT 0;

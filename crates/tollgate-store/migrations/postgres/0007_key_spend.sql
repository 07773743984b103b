-- Each key's spend in its current calendar month (UTC), kept by every ledger batch, so a key's
-- monthly cap is decided by the database, exactly, whichever node opens the hold: a batch that
-- opens a hold on a capped key is refused if spent + held would pass the cap. `month` is
-- year * 12 + month - 1; a charge in a later month starts it afresh (held carries over, as
-- pending holds do). See docs/cluster.md.
CREATE TABLE key_spend (
    key_id       TEXT COLLATE "C" PRIMARY KEY,
    month        INTEGER NOT NULL,
    spent_nanos  BIGINT NOT NULL CHECK (spent_nanos >= 0),
    held_nanos   BIGINT NOT NULL CHECK (held_nanos >= 0)
);

-- What the holds already say, as of this month.
WITH now_utc AS (
    SELECT (now() AT TIME ZONE 'UTC') AS at
), this_month AS (
    SELECT (EXTRACT(YEAR FROM at)::INTEGER * 12 + EXTRACT(MONTH FROM at)::INTEGER - 1) AS month,
           (EXTRACT(EPOCH FROM date_trunc('month', at)) * 1000)::BIGINT AS since
    FROM now_utc
)
INSERT INTO key_spend (key_id, month, spent_nanos, held_nanos)
SELECT h.key_id, m.month,
       COALESCE(SUM(h.charged_nanos) FILTER (WHERE h.status <> 'pending' AND h.resolved_at >= m.since), 0),
       COALESCE(SUM(h.amount_nanos) FILTER (WHERE h.status = 'pending'), 0)
FROM holds h CROSS JOIN this_month m
WHERE h.key_id IS NOT NULL
GROUP BY h.key_id, m.month;

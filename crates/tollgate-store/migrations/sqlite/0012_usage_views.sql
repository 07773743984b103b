-- The console's views of usage. Its charts read quarter-hour totals per key, route and model,
-- kept in the same transaction as the usage rows they sum (so they never disagree), never the
-- rows themselves; its keys page reads a key's newest row by index.
CREATE TABLE usage_slots (
    account_id           TEXT NOT NULL,
    slot_start           INTEGER NOT NULL,
    key_id               TEXT NOT NULL,
    route                TEXT NOT NULL,
    model                TEXT NOT NULL,
    requests             INTEGER NOT NULL,
    errors               INTEGER NOT NULL,
    input_tokens         INTEGER NOT NULL,
    cached_input_tokens  INTEGER NOT NULL,
    output_tokens        INTEGER NOT NULL,
    cost_nanos           INTEGER NOT NULL,
    PRIMARY KEY (account_id, slot_start, key_id, route, model)
);
INSERT INTO usage_slots
SELECT account_id, (created_at / 900000) * 900000, key_id, route, COALESCE(model, ''),
       COUNT(*), SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END),
       COALESCE(SUM(input_tokens), 0), COALESCE(SUM(cached_input_tokens), 0),
       COALESCE(SUM(output_tokens), 0), SUM(cost_nanos)
FROM requests GROUP BY 1, 2, 3, 4, 5;
CREATE INDEX requests_by_key ON requests (key_id, request_id);
-- The overview's keys near their cap are found among capped keys only.
CREATE INDEX api_keys_capped ON api_keys (account_id, id) WHERE monthly_spend_cap_nanos IS NOT NULL;
-- What each account has been charged per calendar month (UTC), kept with the charges, so the
-- balance's "spent this month" is one row, not a walk over the month's ledger.
CREATE TABLE account_spend (
    account_id     TEXT NOT NULL,
    month_start    INTEGER NOT NULL,
    charged_nanos  INTEGER NOT NULL,
    PRIMARY KEY (account_id, month_start)
);
INSERT INTO account_spend
SELECT account_id, CAST(strftime('%s', created_at / 1000, 'unixepoch', 'start of month') AS INTEGER) * 1000,
       SUM(amount_nanos)
FROM ledger_transfers WHERE kind = 'charge' GROUP BY 1, 2;

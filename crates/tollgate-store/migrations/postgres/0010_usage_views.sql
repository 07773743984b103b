-- The console's views of usage. Its charts read quarter-hour totals per key, route and model,
-- kept in the same transaction as the usage rows they sum (so they never disagree), never the
-- rows themselves; its keys page reads a key's newest row by index.
CREATE TABLE usage_slots (
    account_id           TEXT COLLATE "C" NOT NULL,
    slot_start           BIGINT NOT NULL,
    key_id               TEXT COLLATE "C" NOT NULL,
    route                TEXT COLLATE "C" NOT NULL,
    model                TEXT COLLATE "C" NOT NULL,
    requests             BIGINT NOT NULL,
    errors               BIGINT NOT NULL,
    input_tokens         BIGINT NOT NULL,
    cached_input_tokens  BIGINT NOT NULL,
    output_tokens        BIGINT NOT NULL,
    cost_nanos           BIGINT NOT NULL,
    PRIMARY KEY (account_id, slot_start, key_id, route, model)
);
INSERT INTO usage_slots
SELECT account_id, (created_at / 900000) * 900000, key_id, route, COALESCE(model, ''),
       COUNT(*), COUNT(*) FILTER (WHERE status >= 400),
       COALESCE(SUM(input_tokens), 0), COALESCE(SUM(cached_input_tokens), 0),
       COALESCE(SUM(output_tokens), 0), SUM(cost_nanos)
FROM requests GROUP BY 1, 2, 3, 4, 5;
CREATE INDEX requests_by_key ON requests (key_id, request_id);
-- The overview's keys near their cap are found among capped keys only.
CREATE INDEX api_keys_capped ON api_keys (account_id, id) WHERE monthly_spend_cap_nanos IS NOT NULL;
-- What each account has been charged per calendar month (UTC), kept with the charges, so the
-- balance's "spent this month" is one row, not a walk over the month's ledger.
CREATE TABLE account_spend (
    account_id     TEXT COLLATE "C" NOT NULL,
    month_start    BIGINT NOT NULL,
    charged_nanos  BIGINT NOT NULL,
    PRIMARY KEY (account_id, month_start)
);
INSERT INTO account_spend
SELECT account_id,
       (EXTRACT(EPOCH FROM date_trunc('month', to_timestamp(created_at / 1000.0) AT TIME ZONE 'UTC')) * 1000)::BIGINT,
       SUM(amount_nanos)::BIGINT
FROM ledger_transfers WHERE kind = 'charge' GROUP BY 1, 2;

-- The console's usage charts read an account's rows by time, and its keys page a key's newest
-- row: both by index, not by scanning the account's rows.
CREATE INDEX requests_by_account_time ON requests (account_id, created_at);
CREATE INDEX requests_by_key ON requests (key_id, request_id);

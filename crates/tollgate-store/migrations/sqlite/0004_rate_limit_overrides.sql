-- The operator's own rate-limit numbers for an account or a key: a JSON object from policy name
-- to {"limit", "window_seconds"?, "burst"?}; empty means the configured policies apply as written.
ALTER TABLE api_keys ADD COLUMN rate_limits TEXT NOT NULL DEFAULT '{}';
ALTER TABLE accounts ADD COLUMN rate_limits TEXT NOT NULL DEFAULT '{}';

-- A request ID finds its call's error and, for a replay, the request whose answer it was.
ALTER TABLE requests ADD COLUMN error_message TEXT;
ALTER TABLE requests ADD COLUMN replay_of TEXT;

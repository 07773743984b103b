-- Every change to a key or an account is announced on the channel `tollgate_changes`, so every
-- node drops what it cached of it. Sent by the database itself, at commit, whoever made the
-- change. Payload: 'key:<key id>' or 'account:<account id>'.

CREATE FUNCTION tollgate_announce_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollgate_changes', 'key:' || OLD.id);
    RETURN NULL;
END;
$$;
CREATE TRIGGER api_keys_announce AFTER UPDATE OR DELETE ON api_keys
FOR EACH ROW EXECUTE FUNCTION tollgate_announce_key_change();

CREATE FUNCTION tollgate_announce_account_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollgate_changes', 'account:' || OLD.id);
    RETURN NULL;
END;
$$;
CREATE TRIGGER accounts_announce AFTER UPDATE OR DELETE ON accounts
FOR EACH ROW EXECUTE FUNCTION tollgate_announce_account_change();

-- The writer fence: at most one operator process writes a schema at a time, and a
-- process that has been replaced cannot write again, even if it wakes up later with
-- its connections and transactions still open (a hung or partitioned host).
--
-- A writer starts its term by bumping `epoch` (SELECT ... FOR UPDATE, then UPDATE) and
-- keeps `beat_at` fresh while it works. Every write transaction first calls
-- writer_fence_check(its epoch), which takes FOR KEY SHARE on the row: the check
-- fails once a newer term has begun, and a new term cannot begin while an older
-- writer's transaction that passed the check is still open. A successor that finds the
-- holder's heartbeat older than the holder's lease terminates the holder's backends
-- (known by `holder_app`, its application_name), which aborts those transactions.
-- The heartbeat is a non-key UPDATE, so it does not conflict with the checks.
-- One fence per writer scope: '' for an unsharded operator, one per shard
-- (`--shard-selector`) otherwise, since shards write disjoint customers of one schema.
CREATE TABLE writer_fence (
    name        text        PRIMARY KEY DEFAULT '',
    epoch       bigint      NOT NULL DEFAULT 0,
    -- Who holds the current term ('' when released): identity, and the
    -- application_name of every connection it opened.
    holder      text        NOT NULL DEFAULT '',
    holder_app  text        NOT NULL DEFAULT '',
    beat_at     timestamptz NOT NULL DEFAULT now(),
    lease_ms    integer     NOT NULL DEFAULT 15000
);
INSERT INTO writer_fence DEFAULT VALUES;

-- Raises (SQLSTATE M3OF1) unless `mine` is the current term; on success the epoch is
-- recorded for the rest of the transaction (writer_fence_stamp reads it).
CREATE FUNCTION writer_fence_check(fence text, mine bigint) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    current_epoch bigint;
BEGIN
    SELECT epoch INTO current_epoch FROM writer_fence WHERE name = fence FOR KEY SHARE;
    IF mine IS NULL OR mine <= 0 OR current_epoch IS DISTINCT FROM mine THEN
        RAISE EXCEPTION 'writer fence: term % is not the current term %', mine, current_epoch
            USING ERRCODE = 'M3OF1';
    END IF;
    PERFORM set_config('m3o.writer_epoch', mine::text, true);
END $$;

-- Every row written records the term that wrote it (an audit trail, and what the
-- fencing tests check). A write that did not pass writer_fence_check is refused once
-- any term has begun in this schema, so a write path that forgets the check fails
-- loudly instead of slipping past the fence. (Schemas with epoch 0 have never had an
-- operator: the relay's own tests write the outbox directly.)
CREATE FUNCTION writer_fence_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    stamped text := nullif(current_setting('m3o.writer_epoch', true), '');
BEGIN
    IF stamped IS NULL AND EXISTS (SELECT 1 FROM writer_fence WHERE epoch > 0) THEN
        RAISE EXCEPTION 'writer fence: % on %.% outside a checked write transaction',
            TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = 'M3OF2';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    NEW.writer_epoch := stamped::bigint;
    RETURN NEW;
END $$;

ALTER TABLE customers ADD COLUMN writer_epoch bigint;
ALTER TABLE subscriptions ADD COLUMN writer_epoch bigint;
ALTER TABLE api_keys ADD COLUMN writer_epoch bigint;
ALTER TABLE outbox ADD COLUMN writer_epoch bigint;
CREATE TRIGGER customers_writer_fence BEFORE INSERT OR UPDATE OR DELETE ON customers
    FOR EACH ROW EXECUTE FUNCTION writer_fence_stamp();
CREATE TRIGGER subscriptions_writer_fence BEFORE INSERT OR UPDATE OR DELETE ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION writer_fence_stamp();
CREATE TRIGGER api_keys_writer_fence BEFORE INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION writer_fence_stamp();
-- Outbox rows are stamped when written; the relay's bookkeeping (published_at,
-- attempts, parking) runs in transactions that also pass the check.
CREATE TRIGGER outbox_writer_fence BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION writer_fence_stamp();

-- Customers: the system of record for the Customer resource.
CREATE TABLE customers (
    id            uuid PRIMARY KEY,
    email         text        NOT NULL,
    name          text        NOT NULL DEFAULT '',
    status        text        NOT NULL,
    meta          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    k8s_namespace text        NOT NULL,
    k8s_name      text        NOT NULL,
    k8s_uid       text        NOT NULL,
    generation    bigint      NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);
-- Identity survives lost status: a re-applied resource finds its live row by namespace/name.
CREATE UNIQUE INDEX customers_live_k8s_ref ON customers (k8s_namespace, k8s_name) WHERE deleted_at IS NULL;
-- An email belongs to at most one live customer (case-insensitive, as mail providers treat it).
CREATE UNIQUE INDEX customers_live_email ON customers (lower(email)) WHERE deleted_at IS NULL;

-- Transactional outbox: written in the same transaction as the change it announces,
-- published to Redis Streams in seq order by the relay.
CREATE TABLE outbox (
    id           uuid PRIMARY KEY,
    seq          bigserial   NOT NULL UNIQUE,
    topic        text        NOT NULL,
    event_type   text        NOT NULL,
    aggregate_id text        NOT NULL,
    payload      bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    attempts     integer     NOT NULL DEFAULT 0
);
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;

-- Wake the relay on commit instead of polling. The channel carries the schema so that
-- relays of different schemas (tests, tenants) sharing one database ignore each other.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('m3o_outbox', TG_TABLE_SCHEMA);
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

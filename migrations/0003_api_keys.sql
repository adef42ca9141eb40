-- API keys: the hash of each key a resource was ever issued. The plaintext lives only
-- in the ApiKey's Secret; it is never stored here.
CREATE TABLE api_keys (
    id                  uuid PRIMARY KEY,            -- the keyId, also in the Secret
    customer_id         uuid        NOT NULL,
    key_hash            text        NOT NULL UNIQUE, -- hex SHA-256 of the key
    key_prefix          text        NOT NULL,        -- first 8 characters, not secret
    scopes              text[]      NOT NULL,
    status              text        NOT NULL,        -- active | blocked | expired | revoked
    description         text        NOT NULL DEFAULT '',
    expires_at          timestamptz,
    k8s_namespace       text        NOT NULL,
    k8s_name            text        NOT NULL,
    k8s_uid             text        NOT NULL,
    generation          bigint      NOT NULL DEFAULT 0,
    rotation_generation bigint      NOT NULL DEFAULT 0,
    -- set on the previous key when a rotation issues a new one: valid until then
    grace_until         timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    revoked_at          timestamptz
);
CREATE INDEX api_keys_live_k8s_ref ON api_keys (k8s_namespace, k8s_name) WHERE revoked_at IS NULL;
CREATE INDEX api_keys_live_customer ON api_keys (customer_id) WHERE revoked_at IS NULL;

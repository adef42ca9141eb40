-- Why a key is blocked (spec.blockedMessage), carried to the gateway entry so a gateway
-- can tell the caller. Empty when the key is not blocked by spec.
ALTER TABLE api_keys ADD COLUMN blocked_message text NOT NULL DEFAULT '';

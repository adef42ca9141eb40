-- A key whose gateway entry is gone for good (revoked, or past its rotation's grace
-- period, and confirmed absent from etcd) is no longer read by convergence: a customer
-- with years of rotations costs what its live keys cost. Any write of the row clears
-- the mark (api_keys::update), so a row that changes is looked at again.
ALTER TABLE api_keys ADD COLUMN config_gone boolean NOT NULL DEFAULT false;
CREATE INDEX api_keys_customer_config_live ON api_keys (customer_id) WHERE NOT config_gone;

-- The etcd revision of the operator's last write to a key's gateway entry
-- (apikeys/<hash>: put or delete). The ApiKey's GatewaySynced condition is True once
-- every live gateway replica reports an applied revision at least this high.
ALTER TABLE api_keys ADD COLUMN config_revision bigint;

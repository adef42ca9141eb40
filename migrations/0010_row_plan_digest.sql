-- The digest of the content the operator planned for a row, written with the row by
-- the operator (pipeline::row_plan::RowDigest, over the columns its plan decides).
-- The bulk comparison (runtime/resync.rs) digests each live row's current columns the
-- same way: a row edited by hand no longer matches the digest its last write stored,
-- and a plan that changed while nothing else did (the catalog) no longer matches the
-- digest the resource asks for now. Either sends the object to a reconcile, which
-- repairs the row. NULL (a row written before this migration) counts as differing, so
-- every such row is rewritten once.
ALTER TABLE customers ADD COLUMN plan_digest text;
ALTER TABLE subscriptions ADD COLUMN plan_digest text;
ALTER TABLE api_keys ADD COLUMN plan_digest text;

-- Records whose resource was deleted under deletionPolicy Orphan (kept on purpose).
-- After a restore (recovery rule, DESIGN section 4) a live record whose resource is
-- gone is retired as if deleted now, unless it is marked here: only Orphan keeps one.
-- A record written again for a resource (re-applied, adopted) is no longer marked.
ALTER TABLE customers ADD COLUMN orphaned_at timestamptz;
ALTER TABLE subscriptions ADD COLUMN orphaned_at timestamptz;
ALTER TABLE api_keys ADD COLUMN orphaned_at timestamptz;
-- Releases before this one kept Orphan records without a mark: every live record at
-- this upgrade is marked, so the first recovery pass cannot take one of those for a
-- record to retire. The upgrade rewrites every row once (migration 0010's digest is
-- NULL), and a write clears the mark of each record whose resource exists.
UPDATE customers SET orphaned_at = now() WHERE deleted_at IS NULL;
UPDATE subscriptions SET orphaned_at = now() WHERE cancelled_at IS NULL;
UPDATE api_keys SET orphaned_at = now() WHERE revoked_at IS NULL;

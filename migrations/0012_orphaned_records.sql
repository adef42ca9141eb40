-- Records whose resource was deleted under deletionPolicy Orphan (kept on purpose).
-- After a restore (recovery rule, DESIGN section 4) a live record whose resource is
-- gone is retired as if deleted now, unless it is marked here: only Orphan keeps one.
-- A record written again for a resource (re-applied, adopted) is no longer marked.
ALTER TABLE customers ADD COLUMN orphaned_at timestamptz;
ALTER TABLE subscriptions ADD COLUMN orphaned_at timestamptz;
ALTER TABLE api_keys ADD COLUMN orphaned_at timestamptz;

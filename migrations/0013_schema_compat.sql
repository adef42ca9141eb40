-- The rollback policy's floor (README "Upgrade and roll back"): the newest migration
-- that a binary must know to run on this schema. Additive migrations leave it alone, so
-- the binary of a rollback keeps running on a schema migrated further; a migration that
-- an older binary cannot use (a drop, a rename, a changed meaning) raises it to its own
-- version, and older binaries then refuse to start instead of failing at run time.
CREATE TABLE schema_compat (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    oldest_binary_migration bigint NOT NULL
);
INSERT INTO schema_compat (one, oldest_binary_migration) VALUES (true, 0);

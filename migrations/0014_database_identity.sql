-- The identity of this database (schema): a random id generated once, by this
-- migration, and recorded in etcd beside the prefix with the writer term
-- (`<prefix>.writer-epoch.database`). Two databases sharing one --etcd-prefix (a
-- misconfiguration: blue/green with two schemas) would otherwise raise their terms above
-- each other and take turns converging the prefix from different data; an operator
-- writes etcd only while the id there is its database's (or none is recorded: a wiped
-- etcd still heals). Additive: older binaries neither read nor need it. A dump restored
-- elsewhere keeps its id (it is the same data); to move a prefix to a new database,
-- delete the etcd key by hand.
CREATE TABLE database_identity (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    id  uuid    NOT NULL DEFAULT gen_random_uuid()
);
INSERT INTO database_identity DEFAULT VALUES;

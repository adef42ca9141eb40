//! How the controllers run: the shared context, the controller runner (span, metrics,
//! backoff), the lanes of changes, the shared Customer watch and the index of its
//! referents, relist tracking, the bulk resync, the etcd drift watcher, the finalizer, sharding and failpoints. Nothing here
//! knows what a kind provisions.

pub mod backoff;
pub mod changes;
pub mod context;
pub mod drift;
pub mod failpoint;
pub mod feed;
pub mod finalizer;
pub mod lanes;
pub mod orphans;
pub mod referents;
pub mod relist;
pub mod resync;
pub mod runner;
pub mod shard;

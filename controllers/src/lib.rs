//! Controllers of m3o-operator.
//!
//! Where things live (the map with the arrows between them: ARCHITECTURE.md):
//! - `customer/`, `subscription/`, `apikey/`: one folder per kind, the same files in the
//!   same roles ([`pipeline`]: `plan.rs` decides, `build.rs` builds, `reconcile.rs` loads
//!   and applies, `cleanup.rs` deletes). A Customer becomes a Postgres row in
//!   [`customer::reconcile`] via [`store::customers`].
//! - `pipeline/`: what the kinds' plans share (the row write of one-row kinds, outbox
//!   events, the object a row belongs to).
//! - `store/`: Postgres (system of record), one module per table.
//! - `platform/`: the etcd platform config: what each record publishes
//!   (`published.rs`, in the values of the `m3o-platform-contract` crate), what etcd
//!   should hold (`desired.rs`), one customer's convergence (`sync.rs`).
//! - `runtime/`: how the controllers run: context, runner, lanes, the shared Customer
//!   watch, the bulk resync, the drift watcher, finalizer, backoff, shards, failpoints.
//! - `report/`: what admins see: status, conditions, errors with their reasons,
//!   blockers, metrics.
//! - `plans.rs` (the plan catalog), `duration.rs` (Go durations).

pub mod apikey;
pub mod customer;
pub mod duration;
pub mod pipeline;
pub mod plans;
pub mod platform;
pub mod report;
pub mod runtime;
pub mod store;
pub mod subscription;
#[cfg(test)]
mod testkit;
pub mod usage;

pub use runtime::context::{Context, Settings};

/// Every kind the operator reconciles.
pub const KINDS: [&str; 3] = [customer::KIND, subscription::KIND, apikey::KIND];
pub use report::error::Error;

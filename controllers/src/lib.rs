//! Controllers of m3o-operator.
//!
//! Where things live:
//! - `customer/`: the Customer kind (`plan.rs` decides, `reconcile.rs` applies,
//!   `cleanup.rs` deletes). A Customer becomes a Postgres row in
//!   [`customer::reconcile`] via [`store::customers`].
//! - `subscription/`: the Subscription kind, same layout; `plans.rs` is its plan catalog.
//! - `apikey/`: the ApiKey kind (`secret.rs` issues keys, `config.rs` is the gateway entry).
//! - `store/`: Postgres (system of record) and migrations.
//! - `platform/`: etcd platform config and drift correction.
//! - `status.rs`, `finalizer.rs`, `backoff.rs`, `metrics.rs`: mechanics every kind shares.

pub mod apikey;
pub mod backoff;
pub mod blocker;
pub mod context;
pub mod customer;
pub mod duration;
pub mod error;
pub mod failpoint;
pub mod finalizer;
#[cfg(test)]
mod fixtures;
pub mod k8s_ref;
pub mod lifecycle;
pub mod metrics;
pub mod outbox_events;
pub mod pipeline;
#[cfg(test)]
mod planner_props;
pub mod plans;
pub mod platform;
pub mod row_plan;
pub mod runner;
pub mod shard;
pub mod status;
pub mod store;
pub mod subscription;

pub use context::{Context, Settings};

/// Every kind the operator reconciles.
pub const KINDS: [&str; 3] = [customer::KIND, subscription::KIND, apikey::KIND];
pub use error::Error;

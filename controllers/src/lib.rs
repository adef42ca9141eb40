//! Controllers of m3o-operator.
//!
//! Where things live (the whole picture: ARCHITECTURE.md at the repository root):
//! - `customer/`, `subscription/`, `apikey/`: one folder per kind, each with the same
//!   files in the same roles ([`pipeline`]: `plan.rs` decides, `build.rs` builds,
//!   `reconcile.rs` loads and applies, `cleanup.rs` deletes). A Customer becomes a
//!   Postgres row in [`customer::reconcile`] via [`store::customers`]; `plans.rs` is the
//!   Subscription plan catalog; `apikey/secret.rs` is key material.
//! - `store/`: Postgres (system of record), one module per table.
//! - `platform/`: etcd platform config and drift correction.
//! - `runner.rs`, `finalizer.rs`, `lifecycle.rs`, `status.rs`, `row_plan.rs`,
//!   `outbox_events.rs`, `blocker.rs`, `error.rs`, `backoff.rs`, `metrics.rs`:
//!   mechanics every kind shares.

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

pub use runtime::context::{Context, Settings};

/// Every kind the operator reconciles.
pub const KINDS: [&str; 3] = [customer::KIND, subscription::KIND, apikey::KIND];
pub use report::error::Error;

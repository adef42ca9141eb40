//! Controllers of m3o-operator.
//!
//! Where things live:
//! - `customer/`: the Customer kind (`plan.rs` decides, `reconcile.rs` applies,
//!   `cleanup.rs` deletes). A Customer becomes a Postgres row in
//!   [`customer::reconcile`] via [`store::customers`].
//! - `store/`: Postgres (system of record) and migrations.
//! - `platform/`: etcd platform config and drift correction.
//! - `status.rs`, `finalizer.rs`, `backoff.rs`, `metrics.rs`: mechanics every kind shares.

pub mod backoff;
pub mod context;
pub mod customer;
pub mod duration;
pub mod error;
pub mod finalizer;
pub mod metrics;
pub mod platform;
pub mod runner;
pub mod status;
pub mod store;

pub use context::{Context, Settings};
pub use error::Error;

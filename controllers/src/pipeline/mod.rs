//! The pipeline every kind follows, written once (each kind's `mod.rs` points here).
//!
//! A reconcile runs five steps, each in its own file of the kind's folder:
//!
//! 1. **load** (`reconcile.rs`): read what the decision needs: the object's Customer, its
//!    records in Postgres, the Secret, siblings. Only reads.
//! 2. **plan** (`plan.rs`): pure functions from what was loaded to what to write (the
//!    row write and the events it announces) or a [`crate::report::blocker::Blocker`] (an
//!    outcome only an admin or time resolves: conflict, missing or unready Customer,
//!    unknown plan, invalid spec). No I/O, unit-tested, also from the YAML fixtures
//!    under `controllers/tests/fixtures/`.
//! 3. **build** (`build.rs`): pure builders of what is written: status, child objects
//!    (the ApiKey's Secret), M3O events. No I/O, unit-tested.
//! 4. **apply** (`reconcile.rs`): one Postgres transaction for the records and their
//!    outbox events ([`crate::pipeline::row_plan`] for the kinds with one row,
//!    [`crate::pipeline::outbox_events`]), then the etcd platform config of the customers whose
//!    records changed ([`crate::report::lifecycle::converge_customers`]), then status and
//!    Kubernetes Events ([`crate::report::lifecycle::report_provisioned`]).
//! 5. **report**: a blocker is written to status by [`crate::report::lifecycle::report_blocked`]
//!    and retried later; an error names its step ([`crate::report::error::Step`]) and is
//!    written to status by [`crate::runtime::runner`], which also counts it, backs off and keeps
//!    every log line of the reconcile in a span naming the object.
//!
//! Deletion (`cleanup.rs`) is the same shape behind the finalizer
//! ([`crate::runtime::finalizer`]): load, one transaction, etcd, and every step tolerates having
//! run before.

pub mod dependent;
pub mod k8s_ref;
pub mod outbox_events;
pub mod row_plan;

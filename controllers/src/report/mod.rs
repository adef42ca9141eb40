//! What the operator tells admins: status conditions written by server-side apply
//! (`status`), the reports of a reconcile's outcome (`lifecycle`), errors that name
//! their step with their condition reason and metric label (`error`), the `Ready=False`
//! reasons that are not errors (`blocker`), and Prometheus metrics.

pub mod blocker;
pub mod error;
pub mod lifecycle;
pub mod metrics;
pub mod status;

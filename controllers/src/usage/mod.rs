//! Usage and quota as reconciled state (README "Usage and quota"): the leader rolls the
//! gateways' Redis usage counters into `usage_daily` every `--usage-interval`, queues
//! `QuotaThresholdReached` once per customer, period and threshold, and confirms closed
//! days to the gateways by lowering their counters' TTL.
//!
//! `plan.rs` decides (pure: parsing, days, periods, thresholds, event payloads);
//! `rollup.rs` does the Redis and Postgres I/O.

pub mod book;
pub mod plan;
pub mod rollup;

//! The contract between m3o-operator and the gateways that read its etcd prefix
//! (README "The resources", docs/gateway.md): where each value lives ([`keys`]), what it holds ([`values`]),
//! and what a gateway must do with a key ([`standing`]). The operator writes these and
//! the gateway reads them through this one crate, so the two cannot drift apart.
//!
//! Depends only on serde: no I/O, no clock (times are a type parameter), no etcd client.

pub mod keys;
pub mod standing;
pub mod usage;
pub mod values;

pub use keys::{Slot, apikey_key, classify, customer_key, gateway_key, quota_key};
pub use standing::{KeyFacts, Owner, Standing, standing};
pub use values::{ApiKeyValue, CustomerValue, GatewayReport, KeyStatus, QuotaValue, StaleMode};

//! Types shared by the three kinds.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// A reference to a Customer in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomerRef {
    /// Name of the Customer resource in this namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What happens to the external records (Postgres row, etcd keys, Secret) when the
/// resource is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Mark the record deleted/revoked, emit the deletion event, remove etcd keys.
    #[default]
    Delete,
    /// Leave the external records in place; only the Kubernetes object goes away.
    Orphan,
}

/// An effective quota, as enforced by the API gateway.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Quota {
    /// Requests allowed per calendar month; 0 means none.
    pub monthly_requests: i64,
    /// Sustained requests per second; 0 means none.
    pub requests_per_second: i32,
}

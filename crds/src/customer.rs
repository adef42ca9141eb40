//! The Customer resource: one M3O customer account.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, DeletionPolicy};

/// A customer of the M3O platform. The operator keeps a `customers` row in Postgres,
/// `<prefix>/customers/<id>` in etcd, and publishes lifecycle events.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "m3o.com",
    version = "v1alpha1",
    kind = "Customer",
    namespaced,
    status = "CustomerStatus",
    category = "m3o",
    shortname = "cust",
    doc = "A customer of the M3O platform: provisioned as a Postgres record, an etcd entry read by the API gateway, and lifecycle events.",
    printcolumn(name = "Email", type_ = "string", json_path = ".spec.email"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "ID",
        type_ = "string",
        json_path = ".status.customerId",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(oldSelf.id) || (has(self.id) && self.id == oldSelf.id)")
    .message("id is immutable once set").field_path(".id"))]
#[serde(rename_all = "camelCase")]
pub struct CustomerSpec {
    /// Email address of the customer; unique among live customers (case-insensitive).
    #[schemars(
        email,
        length(min = 3, max = 254),
        regex(pattern = r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    )]
    pub email: String,

    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub name: Option<String>,

    /// Account state. Verified and Active customers can use the platform; Banned
    /// customers' API keys are blocked at the gateway.
    #[serde(default)]
    pub state: CustomerState,

    /// Free-form metadata carried into the record and events: at most 64 entries,
    /// keys of 1 to 63 characters, values of at most 1024.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "meta_schema")]
    #[x_kube(validation = Rule::new("self.all(k, size(k) >= 1 && size(k) <= 63)")
        .message("meta keys must be 1 to 63 characters"))]
    pub meta: BTreeMap<String, String>,

    /// UUID of an existing customer record to adopt. Immutable once set; when unset
    /// the operator assigns one (see status.customerId).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    ))]
    pub id: Option<String>,

    /// What happens to the external records when this resource is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Desired account state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CustomerState {
    /// Signed up, email not yet verified.
    Unverified,
    /// Email verified.
    Verified,
    /// In good standing (the default).
    #[default]
    Active,
    /// Banned: API keys stop authenticating until unbanned.
    Banned,
}

impl CustomerState {
    /// The M3O status string stored in Postgres, etcd and events.
    pub fn as_m3o(self) -> CustomerStatusState {
        match self {
            Self::Unverified => CustomerStatusState::Unverified,
            Self::Verified => CustomerStatusState::Verified,
            Self::Active => CustomerStatusState::Active,
            Self::Banned => CustomerStatusState::Banned,
        }
    }
}

/// Lowercase M3O customer status.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CustomerStatusState {
    /// Email not yet verified.
    Unverified,
    /// Email verified.
    Verified,
    /// In good standing.
    Active,
    /// Banned.
    Banned,
    /// Deleted (the record is kept, marked deleted).
    Deleted,
}

impl CustomerStatusState {
    /// The string used in Postgres, etcd and event payloads.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unverified => "unverified",
            Self::Verified => "verified",
            Self::Active => "active",
            Self::Banned => "banned",
            Self::Deleted => "deleted",
        }
    }

    /// Parses the stored string; `None` for anything unknown.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Unverified,
            Self::Verified,
            Self::Active,
            Self::Banned,
            Self::Deleted,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// Observed state of a Customer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomerStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Current conditions; `Ready` is True when Postgres and etcd match this generation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// UUID of the customer record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,

    /// M3O status of the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<CustomerStatusState>,
}

/// Bounds of `spec.meta`: a map of at most [`META_MAX_ENTRIES`] strings of at most
/// [`META_MAX_VALUE`] characters (key lengths are checked by a CEL rule).
fn meta_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": META_MAX_ENTRIES,
        "additionalProperties": {"type": "string", "maxLength": META_MAX_VALUE},
    })
}

/// Most entries in `spec.meta`.
pub const META_MAX_ENTRIES: usize = 64;
/// Longest value in `spec.meta`, in characters.
pub const META_MAX_VALUE: usize = 1024;

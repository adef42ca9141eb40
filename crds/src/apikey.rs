//! The ApiKey resource: an API key issued into a Secret, known elsewhere only by hash.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, CustomerRef, DeletionPolicy};

/// An API key of a customer. The plaintext lives only in the Secret `secretName`;
/// Postgres and etcd hold its SHA-256.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "m3o.com",
    version = "v1alpha1",
    kind = "ApiKey",
    namespaced,
    status = "ApiKeyStatus",
    category = "m3o",
    shortname = "apikey",
    shortname = "ak",
    selectable = ".spec.customerRef.name",
    doc = "An API key of a customer: the key is issued into a Secret, its hash is published to etcd for the API gateway.",
    printcolumn(
        name = "Customer",
        type_ = "string",
        json_path = ".spec.customerRef.name"
    ),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Prefix", type_ = "string", json_path = ".status.keyPrefix"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".spec.expiresAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.secretName) == has(oldSelf.secretName) && (!has(self.secretName) || self.secretName == oldSelf.secretName)")
    .message("secretName is immutable").field_path(".secretName"))]
#[x_kube(validation = Rule::new("self.rotationGeneration >= oldSelf.rotationGeneration")
    .message("rotationGeneration can only increase").field_path(".rotationGeneration"))]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySpec {
    /// The Customer (same namespace) that owns this key. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("customerRef is immutable"))]
    pub customer_ref: CustomerRef,

    /// What the key is for, shown to the customer.
    #[schemars(length(min = 1, max = 512))]
    pub description: String,

    /// APIs the key may call: `*` for all, or API names such as `helloworld`.
    #[schemars(
        length(min = 1, max = 64),
        inner(length(min = 1, max = 63), regex(pattern = r"^(\*|[a-z0-9-]+)$"))
    )]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub scopes: Vec<String>,

    /// Name of the Secret that receives the key (data keys `apiKey` and `keyId`).
    /// Defaults to `<metadata.name>-api-key`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub secret_name: Option<String>,

    /// Block the key: the gateway rejects it until unblocked.
    #[serde(default)]
    pub blocked: bool,

    /// Why the key is blocked, for the customer: shown in status, carried by the
    /// BlockKey event and the gateway entry (a gateway can show it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub blocked_message: Option<String>,

    /// When the key stops authenticating (RFC 3339). Unset: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,

    /// Bump to issue a new key; the previous one stays valid for rotationGracePeriod.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub rotation_generation: i64,

    /// How long the previous key stays valid after a rotation (Go duration, e.g. `1h`,
    /// `90s`; at most `8760h`, one year).
    #[serde(default = "default_grace_period")]
    #[schemars(
        length(min = 2, max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    #[x_kube(validation = Rule::new("duration(self) <= duration('8760h')")
        .message("rotationGracePeriod must be at most 8760h (one year)"))]
    pub rotation_grace_period: String,

    /// What happens to the external records when this resource is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn default_grace_period() -> String {
    "1h".to_owned()
}

/// State of a key as the gateway sees it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApiKeyState {
    /// Authenticates requests.
    Active,
    /// Rejected until unblocked (by spec.blocked or because the customer is banned).
    Blocked,
    /// Past expiresAt.
    Expired,
    /// Revoked for good.
    Revoked,
}

impl ApiKeyState {
    /// The string used in Postgres, etcd and status.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Blocked => "blocked",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }

    /// Parses the stored string; `None` for anything unknown.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Active, Self::Blocked, Self::Expired, Self::Revoked]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// Observed state of an ApiKey.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Current conditions; `Ready` is True when Postgres, etcd and the Secret match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// UUID of the key record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,

    /// UUID of the owning customer record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,

    /// Secret holding the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,

    /// First 8 characters of the key (not secret), to recognise it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,

    /// State as the gateway sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ApiKeyState>,

    /// When the key expires, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,

    /// When the current key was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotated_at: Option<Time>,
}

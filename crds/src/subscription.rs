//! The Subscription resource: a customer's billing tier and quota.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, CustomerRef, DeletionPolicy, Quota};

/// A customer's subscription to a plan. At most one live Subscription per customer:
/// the one whose record is in force keeps it; when none is, the oldest takes it. The
/// others report `Ready=False`, reason `Conflict`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "m3o.com",
    version = "v1alpha1",
    kind = "Subscription",
    namespaced,
    status = "SubscriptionStatus",
    category = "m3o",
    shortname = "sub",
    selectable = ".spec.customerRef.name",
    doc = "A customer's subscription to a plan of the operator's plan catalog; its effective quota is published to etcd for the API gateway.",
    printcolumn(
        name = "Customer",
        type_ = "string",
        json_path = ".spec.customerRef.name"
    ),
    printcolumn(name = "Plan", type_ = "string", json_path = ".spec.plan"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Used", type_ = "string", json_path = ".status.usage.used"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionSpec {
    /// The Customer (same namespace) this subscription belongs to. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("customerRef is immutable"))]
    pub customer_ref: CustomerRef,

    /// Plan name from the operator's plan catalog (for example free, pro, business).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub plan: String,

    /// Overrides of the plan's default quota; unset fields keep the plan's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaOverride>,

    /// What happens to the external records when this resource is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Per-subscription quota overrides.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaOverride {
    /// Requests allowed per calendar month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub monthly_requests: Option<i64>,

    /// Sustained requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub requests_per_second: Option<i32>,
}

/// Lifecycle state of a subscription.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SubscriptionState {
    /// Waiting for its Customer, a valid plan, or the slot held by another Subscription.
    Pending,
    /// In force: the quota is published.
    Active,
    /// Cancelled (the record is kept).
    Cancelled,
}

impl SubscriptionState {
    /// The string used in Postgres and status.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Observed state of a Subscription.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Current conditions; `Ready` is True when Postgres and etcd match this generation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// UUID of the subscription record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,

    /// UUID of the customer record it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,

    /// The plan in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,

    /// Effective quota: plan defaults overridden by spec.quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,

    /// Lifecycle state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<SubscriptionState>,

    /// The period's metered requests (from the gateways' counters, rolled up every
    /// --usage-interval; written on a 50/80/100% crossing or a new period, otherwise at
    /// most every --usage-status-interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageStatus>,
}

/// A subscription's usage in the current billing period.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageStatus {
    /// Billing period, `YYYY-MM` (UTC calendar month).
    pub period: String,
    /// Requests the gateways allowed in the period.
    pub requests: i64,
    /// The quota's monthly requests.
    pub monthly_requests: i64,
    /// `requests` as a percentage of `monthlyRequests`, e.g. `80%` (the `Used` column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<String>,
}

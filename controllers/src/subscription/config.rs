//! What a subscription publishes to etcd (a contract: ARCHITECTURE.md): its quota under
//! `quotas/<customerId>`, and its plan in the customer's own value. The platform module
//! ([`crate::platform::desired`]) wires these into the single definition of etcd.

use m3o_crds::Subscription;
use serde::Serialize;
use uuid::Uuid;

use crate::platform::entry::{DesiredEntry, owner_ref};
use crate::store::subscriptions::SubscriptionRow;

/// `<prefix>/quotas/<customerId>`: what the gateway enforces for a customer (contract).
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct QuotaConfig {
    pub plan: String,
    pub monthly_requests: i64,
    pub requests_per_second: i32,
}

/// The key of a customer's quota, relative to the prefix.
pub fn quota_key(customer_id: Uuid) -> String {
    format!("quotas/{customer_id}")
}

/// The quota value of a subscription in force.
pub fn quota_value(row: &SubscriptionRow) -> serde_json::Value {
    let config = QuotaConfig {
        plan: row.plan.clone(),
        monthly_requests: row.monthly_requests,
        requests_per_second: row.requests_per_second,
    };
    serde_json::to_value(config).unwrap_or_default()
}

/// The quota key's entry, owned by the Subscription (for drift Events).
pub fn quota_entry(row: &SubscriptionRow) -> DesiredEntry {
    DesiredEntry {
        value: quota_value(row),
        owner: owner_ref::<Subscription>(&row.k8s_namespace, &row.k8s_name, &row.k8s_uid),
    }
}

/// The `plan` field of a customer's value: its subscription's plan, empty without one.
pub fn customer_plan(row: Option<&SubscriptionRow>) -> String {
    row.map(|r| r.plan.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_value_has_the_contract_fields() {
        let row = SubscriptionRow {
            id: Uuid::nil(),
            customer_id: Uuid::nil(),
            plan: "pro".into(),
            monthly_requests: 7,
            requests_per_second: 3,
            status: "active".into(),
            k8s_namespace: "ns".into(),
            k8s_name: "s".into(),
            k8s_uid: "u".into(),
            generation: 1,
            created_at: chrono::DateTime::UNIX_EPOCH,
            updated_at: chrono::DateTime::UNIX_EPOCH,
            cancelled_at: None,
        };
        assert_eq!(
            quota_value(&row),
            serde_json::json!({"plan": "pro", "monthlyRequests": 7, "requestsPerSecond": 3})
        );
        assert_eq!(
            quota_entry(&row).owner.kind.as_deref(),
            Some("Subscription")
        );
        assert_eq!(customer_plan(Some(&row)), "pro");
        assert_eq!(customer_plan(None), "");
    }
}

//! What etcd should hold, derived from Postgres: the single definition shared by the
//! reconcilers (fast path after a change) and the drift watcher (restore and prune).

use std::collections::{BTreeMap, HashMap};

use chrono::Utc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use m3o_crds::Customer;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::apikey::config as apikey_config;
use crate::store::api_keys;
use crate::store::customers::{self, CustomerRow};
use crate::store::subscriptions;
use crate::subscription::config as subscription_config;

/// `<prefix>/customers/<id>`: what the gateway knows of a customer (contract).
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct CustomerConfig {
    pub id: String,
    pub email: String,
    pub name: String,
    pub status: String,
    /// The plan of the customer's live subscription; empty while it has none.
    pub plan: String,
}

/// The key of a customer, relative to the prefix.
pub fn customer_key(id: Uuid) -> String {
    format!("customers/{id}")
}

/// The value of a live customer row whose subscription in force has `plan` ("" if none).
pub fn customer_value(row: &CustomerRow, plan: String) -> serde_json::Value {
    let config = CustomerConfig {
        id: row.id.to_string(),
        email: row.email.clone(),
        name: row.name.clone(),
        status: row.status.clone(),
        plan,
    };
    serde_json::to_value(config).unwrap_or_default()
}

/// A desired key: its value and the resource it belongs to (for Events).
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredEntry {
    pub value: serde_json::Value,
    pub owner: ObjectReference,
}

/// Which record a key under the prefix belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyOwner {
    Customer(Uuid),
    /// `quotas/<customerId>`: the customer's subscription in force.
    Quota(Uuid),
    /// `apikeys/<sha256 hex>`.
    ApiKey(String),
    /// Not a key this operator writes: it is removed.
    Unowned,
}

/// Where gateway replicas report their applied revision (`gateways/<replica>`, under
/// their own leases): written by the gateways, read by the operator, never pruned.
pub const GATEWAYS_DIR: &str = "gateways/";

/// True for a gateway replica's report: not the operator's to restore or remove.
pub fn is_gateway_report(relative: &str) -> bool {
    relative.starts_with(GATEWAYS_DIR)
}

/// Classifies a key relative to the prefix. Only the canonical form of an id (lowercase,
/// hyphenated: what the operator writes) is owned; any other spelling of the same id
/// (upper case, braces, no hyphens) is a key nothing owns, and is pruned.
pub fn classify(relative: &str) -> KeyOwner {
    match relative.split_once('/') {
        Some(("customers", id)) => canonical_uuid(id).map_or(KeyOwner::Unowned, KeyOwner::Customer),
        Some(("quotas", id)) => canonical_uuid(id).map_or(KeyOwner::Unowned, KeyOwner::Quota),
        Some(("apikeys", hash)) if apikey_config::is_hash(hash) => {
            KeyOwner::ApiKey(hash.to_owned())
        }
        _ => KeyOwner::Unowned,
    }
}

fn canonical_uuid(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s)
        .ok()
        .filter(|id| id.hyphenated().to_string() == s)
}

/// Every key derived from customer `id` (its own config and its dependents'), each with
/// the entry it should have, or `None` when it should not exist. A reconcile that
/// changes a customer calls [`super::PlatformConfig::converge`] on these, so a ban
/// reaches the gateway at once.
pub async fn customer_keys(
    db: &mut PgConnection,
    id: Uuid,
) -> Result<Vec<(String, Option<DesiredEntry>)>, sqlx::Error> {
    let key = customer_key(id);
    let entry = desired_for(db, &key).await?;
    let quota = subscription_config::quota_key(id);
    let quota_entry = desired_for(db, &quota).await?;
    let mut keys = vec![(key, entry), (quota, quota_entry)];
    let customer = customers::live_by_id(&mut *db, id).await?;
    for row in api_keys::all_for_customer(&mut *db, id).await? {
        let entry = apikey_config::entry(&row, customer.as_ref(), Utc::now());
        keys.push((apikey_config::apikey_key(&row.key_hash), entry));
    }
    Ok(keys)
}

/// The desired entry for one key, or `None` when the key should not exist.
pub async fn desired_for(
    db: &mut PgConnection,
    relative: &str,
) -> Result<Option<DesiredEntry>, sqlx::Error> {
    match classify(relative) {
        KeyOwner::Customer(id) => {
            let Some(row) = customers::live_by_id(&mut *db, id).await? else {
                return Ok(None);
            };
            let subscription = subscriptions::live_by_customer(&mut *db, id).await?;
            let plan = subscription_config::customer_plan(subscription.as_ref());
            Ok(Some(customer_entry(&row, plan)))
        }
        KeyOwner::ApiKey(hash) => {
            let Some(row) = api_keys::live_by_hash(&mut *db, &hash).await? else {
                return Ok(None);
            };
            let customer = customers::live_by_id(&mut *db, row.customer_id).await?;
            Ok(apikey_config::entry(&row, customer.as_ref(), Utc::now()))
        }
        KeyOwner::Quota(id) => {
            if customers::live_by_id(&mut *db, id).await?.is_none() {
                return Ok(None);
            }
            let subscription = subscriptions::live_by_customer(&mut *db, id).await?;
            Ok(subscription.as_ref().map(subscription_config::quota_entry))
        }
        KeyOwner::Unowned => Ok(None),
    }
}

/// Every desired key (relative) and entry.
pub async fn desired_all(db: &PgPool) -> Result<BTreeMap<String, DesiredEntry>, sqlx::Error> {
    let mut out = BTreeMap::new();
    // Subscriptions in force of live customers: their quota keys, and each customer's plan.
    let mut plans = BTreeMap::new();
    for sub in subscriptions::all_live_of_live_customers(db).await? {
        let key = subscription_config::quota_key(sub.customer_id);
        out.insert(key, subscription_config::quota_entry(&sub));
        plans.insert(sub.customer_id, sub.plan);
    }
    let live_customers: HashMap<Uuid, CustomerRow> = customers::all_live(db)
        .await?
        .into_iter()
        .map(|row| (row.id, row))
        .collect();
    for row in live_customers.values() {
        out.insert(
            customer_key(row.id),
            customer_entry(row, plans.remove(&row.id).unwrap_or_default()),
        );
    }
    let now = Utc::now();
    for row in api_keys::all_live(db).await? {
        if let Some(entry) = apikey_config::entry(&row, live_customers.get(&row.customer_id), now) {
            out.insert(apikey_config::apikey_key(&row.key_hash), entry);
        }
    }
    Ok(out)
}

fn customer_entry(row: &CustomerRow, plan: String) -> DesiredEntry {
    DesiredEntry {
        value: customer_value(row, plan),
        owner: owner_ref::<Customer>(&row.k8s_namespace, &row.k8s_name, &row.k8s_uid),
    }
}

/// A reference to a resource of kind `K`, for Events about it.
pub fn owner_ref<K: Resource<DynamicType = ()>>(
    namespace: &str,
    name: &str,
    uid: &str,
) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        namespace: Some(namespace.to_owned()),
        name: Some(name.to_owned()),
        uid: (!uid.is_empty()).then(|| uid.to_owned()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_classified() {
        let id = Uuid::new_v4();
        assert_eq!(classify(&customer_key(id)), KeyOwner::Customer(id));
        assert_eq!(classify("customers/not-a-uuid"), KeyOwner::Unowned);
        let quota = subscription_config::quota_key(id);
        assert_eq!(classify(&quota), KeyOwner::Quota(id));
        assert_eq!(classify("quotas/x"), KeyOwner::Unowned);
        assert_eq!(classify("stray"), KeyOwner::Unowned);
        assert_eq!(classify("other/x"), KeyOwner::Unowned);
        let upper = id.hyphenated().to_string().to_uppercase();
        assert_eq!(classify(&format!("customers/{upper}")), KeyOwner::Unowned);
        assert_eq!(
            classify(&format!("quotas/{}", id.simple())),
            KeyOwner::Unowned
        );
        assert!(is_gateway_report("gateways/replica-1") && !is_gateway_report("customers/x"));
    }
}

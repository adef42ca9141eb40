//! What etcd should hold, derived from Postgres: the single definition shared by the
//! reconcilers (fast path after a change) and the drift watcher (restore and prune).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use m3o_crds::Customer;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::store::customers::{self, CustomerRow};

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

/// The value of a live customer row.
pub fn customer_value(row: &CustomerRow) -> serde_json::Value {
    // Subscriptions (and so plans) are not provisioned by this operator version yet.
    let config = CustomerConfig {
        id: row.id.to_string(),
        email: row.email.clone(),
        name: row.name.clone(),
        status: row.status.clone(),
        plan: String::new(),
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
    /// Not a key this operator writes: it is removed.
    Unowned,
}

/// Classifies a key relative to the prefix.
pub fn classify(relative: &str) -> KeyOwner {
    match relative.split_once('/') {
        Some(("customers", id)) => {
            Uuid::parse_str(id).map_or(KeyOwner::Unowned, KeyOwner::Customer)
        }
        _ => KeyOwner::Unowned,
    }
}

/// Every key derived from customer `id` (its own config and its dependents'), each with
/// the entry it should have, or `None` when it should not exist. A reconcile that
/// changes a customer calls [`super::PlatformConfig::converge`] on these, so a ban
/// reaches the gateway at once.
pub async fn customer_keys(
    db: &PgPool,
    id: Uuid,
) -> Result<Vec<(String, Option<DesiredEntry>)>, sqlx::Error> {
    let key = customer_key(id);
    let entry = desired_for(db, &key).await?;
    Ok(vec![(key, entry)])
}

/// The desired entry for one key, or `None` when the key should not exist.
pub async fn desired_for(db: &PgPool, relative: &str) -> Result<Option<DesiredEntry>, sqlx::Error> {
    match classify(relative) {
        KeyOwner::Customer(id) => Ok(customers::live_by_id(db, id)
            .await?
            .map(|row| customer_entry(&row))),
        KeyOwner::Unowned => Ok(None),
    }
}

/// Every desired key (relative) and entry.
pub async fn desired_all(db: &PgPool) -> Result<BTreeMap<String, DesiredEntry>, sqlx::Error> {
    let mut out = BTreeMap::new();
    for row in customers::all_live(db).await? {
        out.insert(customer_key(row.id), customer_entry(&row));
    }
    Ok(out)
}

fn customer_entry(row: &CustomerRow) -> DesiredEntry {
    DesiredEntry {
        value: customer_value(row),
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
        assert_eq!(classify("stray"), KeyOwner::Unowned);
        assert_eq!(classify("other/x"), KeyOwner::Unowned);
    }
}

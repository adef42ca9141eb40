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

/// Values are compared as JSON, so formatting differences are not drift.
pub fn same_value(bytes: &[u8], value: &serde_json::Value) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes).is_ok_and(|v| &v == value)
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

/// The families of keys derived from Postgres, in the order of their relative keys
/// (`apikeys/` < `customers/` < `quotas/`), so paging through them in turn yields every
/// desired key in etcd's key order.
pub const FAMILIES: [Family; 3] = [Family::ApiKeys, Family::Customers, Family::Quotas];

/// A family of desired keys, each listed in key order by [`desired_page`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    ApiKeys,
    Customers,
    Quotas,
}

/// Where a [`desired_page`] scan resumes: the last row it read (a row may have no key,
/// e.g. a key of a deleted customer, so this is not always the last key returned).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageCursor(Option<String>);

/// One page of desired keys of a family, in key order, and the cursor of the next page
/// (`None` when the family is exhausted). Reads at most `limit` rows, so a scan of the
/// whole fleet holds one page at a time.
pub async fn desired_page(
    db: &PgPool,
    family: Family,
    cursor: &PageCursor,
    limit: i64,
) -> Result<(Vec<(String, DesiredEntry)>, Option<PageCursor>), sqlx::Error> {
    let after_id = || cursor.0.as_deref().and_then(|c| Uuid::parse_str(c).ok());
    let mut out = Vec::new();
    let (read, last) = match family {
        Family::Customers => {
            let rows = customers::live_page(db, after_id(), limit).await?;
            let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
            let mut plans: HashMap<Uuid, String> = subscriptions::live_by_customers(db, &ids)
                .await?
                .into_iter()
                .map(|s| (s.customer_id, s.plan))
                .collect();
            for row in &rows {
                let plan = plans.remove(&row.id).unwrap_or_default();
                out.push((customer_key(row.id), customer_entry(row, plan)));
            }
            (rows.len(), rows.last().map(|r| r.id.to_string()))
        }
        Family::Quotas => {
            let rows = subscriptions::live_page_of_live_customers(db, after_id(), limit).await?;
            for sub in &rows {
                let key = subscription_config::quota_key(sub.customer_id);
                out.push((key, subscription_config::quota_entry(sub)));
            }
            (rows.len(), rows.last().map(|r| r.customer_id.to_string()))
        }
        Family::ApiKeys => {
            let rows = api_keys::live_page(db, cursor.0.as_deref(), limit).await?;
            let mut ids: Vec<Uuid> = rows.iter().map(|r| r.customer_id).collect();
            ids.sort_unstable();
            ids.dedup();
            let owners: HashMap<Uuid, CustomerRow> = customers::live_by_ids(db, &ids)
                .await?
                .into_iter()
                .map(|row| (row.id, row))
                .collect();
            let now = Utc::now();
            for row in &rows {
                if let Some(entry) = apikey_config::entry(row, owners.get(&row.customer_id), now) {
                    out.push((apikey_config::apikey_key(&row.key_hash), entry));
                }
            }
            (rows.len(), rows.last().map(|r| r.key_hash.clone()))
        }
    };
    let next = (i64::try_from(read).unwrap_or(i64::MAX) >= limit).then_some(PageCursor(last));
    Ok((out, next))
}

/// Every desired key (relative) and entry.
pub async fn desired_all(db: &PgPool) -> Result<BTreeMap<String, DesiredEntry>, sqlx::Error> {
    const PAGE: i64 = 1000;
    let mut out = BTreeMap::new();
    for family in FAMILIES {
        let mut cursor = PageCursor::default();
        loop {
            let (entries, next) = desired_page(db, family, &cursor, PAGE).await?;
            out.extend(entries);
            match next {
                Some(next) => cursor = next,
                None => break,
            }
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
    fn values_compare_as_json() {
        let v = serde_json::json!({"id": "1", "email": "a@b.c"});
        assert!(same_value(br#"{ "email":"a@b.c","id":"1" }"#, &v));
        assert!(!same_value(br#"{"id":"1","email":"x@b.c"}"#, &v));
        assert!(!same_value(b"not json", &v));
    }

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

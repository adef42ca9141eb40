//! What etcd should hold, derived from Postgres: the single definition shared by the
//! reconcilers (fast path after a change) and the drift watcher (restore and prune).
//! Each kind's `config.rs` builds its entries from rows; this module reads the rows.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use m3o_platform_contract::{Slot, apikey_key, classify as slot_of, customer_key, quota_key};

use super::published::{self, customer_entry, customer_plan, quota_entry};
pub use crate::platform::entry::{DesiredEntry, owner_ref, same_value};
use crate::store::api_keys;
use crate::store::customers::{self, CustomerRow};
use crate::store::subscriptions;

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

/// True for a gateway replica's report: not the operator's to restore or remove.
pub fn is_gateway_report(relative: &str) -> bool {
    matches!(slot_of(relative), Slot::GatewayReport(_))
}

/// Classifies a key relative to the prefix ([`m3o_platform_contract::classify`]): only
/// the canonical form of an id is owned; any other spelling is pruned.
pub fn classify(relative: &str) -> KeyOwner {
    let slot = slot_of(relative);
    let id = |s: &str| Uuid::parse_str(s).ok().filter(|_| slot.is_canonical());
    match slot {
        Slot::Customer(s) => id(s).map_or(KeyOwner::Unowned, KeyOwner::Customer),
        Slot::Quota(s) => id(s).map_or(KeyOwner::Unowned, KeyOwner::Quota),
        Slot::ApiKey(hash) => KeyOwner::ApiKey(hash.to_owned()),
        Slot::GatewayReport(_) | Slot::Other => KeyOwner::Unowned,
    }
}

/// Every key derived from one customer's rows, as one convergence needs them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CustomerKeys {
    /// Each key (relative) with the entry it should have, `None` when it should not exist.
    pub entries: Vec<(String, Option<DesiredEntry>)>,
    /// Hashes of keys retired for good (revoked, or past their grace period): once their
    /// entry is gone, convergence stops reading them ([`api_keys::mark_config_gone`]).
    pub retired: Vec<String>,
}

/// Every key derived from customer `id` (its own config and its dependents'), each with
/// the entry it should have at `now`. Reads the customer's row, its subscription in
/// force and those of its keys whose entry may still exist: three indexed statements,
/// however many keys the customer was ever issued.
pub async fn customer_keys(
    db: &mut PgConnection,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<CustomerKeys, sqlx::Error> {
    let customer = customers::live_by_id(&mut *db, id).await?;
    let subscription = match &customer {
        Some(_) => subscriptions::live_by_customer(&mut *db, id).await?,
        None => None,
    };
    let keys = api_keys::config_live_for_customer(&mut *db, id).await?;
    Ok(customer_keys_of(
        id,
        customer.as_ref(),
        subscription.as_ref(),
        &keys,
        now,
    ))
}

/// [`customer_keys`] from the rows read (pure).
pub fn customer_keys_of(
    id: Uuid,
    customer: Option<&CustomerRow>,
    subscription: Option<&subscriptions::SubscriptionRow>,
    keys: &[api_keys::ApiKeyRow],
    now: DateTime<Utc>,
) -> CustomerKeys {
    let plan = customer_plan(subscription);
    let mut entries = vec![
        (
            customer_key(id),
            customer.map(|row| customer_entry(row, plan)),
        ),
        (quota_key(id), customer.and(subscription).map(quota_entry)),
    ];
    let mut retired = Vec::new();
    for row in keys {
        let entry = published::apikey_entry(row, customer, now);
        if published::is_retired(row, now) {
            retired.push(row.key_hash.clone());
        }
        entries.push((apikey_key(&row.key_hash), entry));
    }
    CustomerKeys { entries, retired }
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
            let plan = customer_plan(subscription.as_ref());
            Ok(Some(customer_entry(&row, plan)))
        }
        KeyOwner::ApiKey(hash) => {
            let Some(row) = api_keys::live_by_hash(&mut *db, &hash).await? else {
                return Ok(None);
            };
            let customer = customers::live_by_id(&mut *db, row.customer_id).await?;
            Ok(published::apikey_entry(&row, customer.as_ref(), Utc::now()))
        }
        KeyOwner::Quota(id) => {
            if customers::live_by_id(&mut *db, id).await?.is_none() {
                return Ok(None);
            }
            let subscription = subscriptions::live_by_customer(&mut *db, id).await?;
            Ok(subscription.as_ref().map(quota_entry))
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
                let key = quota_key(sub.customer_id);
                out.push((key, quota_entry(sub)));
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
                if let Some(entry) = published::apikey_entry(row, owners.get(&row.customer_id), now)
                {
                    out.push((apikey_key(&row.key_hash), entry));
                }
            }
            (rows.len(), rows.last().map(|r| r.key_hash.clone()))
        }
    };
    let next = (i64::try_from(read).unwrap_or(i64::MAX) >= limit).then_some(PageCursor(last));
    Ok((out, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_classified() {
        let id = Uuid::new_v4();
        assert_eq!(classify(&customer_key(id)), KeyOwner::Customer(id));
        assert_eq!(classify(&customer_key("not-a-uuid")), KeyOwner::Unowned);
        let quota = quota_key(id);
        assert_eq!(classify(&quota), KeyOwner::Quota(id));
        assert_eq!(classify(&quota_key("x")), KeyOwner::Unowned);
        assert_eq!(classify("stray"), KeyOwner::Unowned);
        assert_eq!(classify("other/x"), KeyOwner::Unowned);
        let upper = id.hyphenated().to_string().to_uppercase();
        assert_eq!(
            classify(&m3o_platform_contract::customer_key(upper)),
            KeyOwner::Unowned
        );
        assert_eq!(
            classify(&m3o_platform_contract::quota_key(id.simple())),
            KeyOwner::Unowned
        );
        assert!(
            is_gateway_report(&m3o_platform_contract::gateway_key("replica-1"))
                && !is_gateway_report(&customer_key("x"))
        );
    }
}

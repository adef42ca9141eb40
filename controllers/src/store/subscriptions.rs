//! The `subscriptions` table: where a Subscription in force becomes a row.
//!
//! A row is written only once a subscription is in force (`active`); a pending one
//! (unknown plan, customer not ready, slot held by another) has none. Cancelling keeps
//! the row (`cancelled`, `cancelled_at`) for history.

use chrono::{DateTime, Utc};
use m3o_crds::SubscriptionState;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::pipeline::k8s_ref::K8sRef;
use crate::pipeline::row_plan::{Digested, Recorded, RowDigest};

/// `status` of a subscription in force.
pub const ACTIVE: &str = SubscriptionState::Active.as_str();
/// `status` of a cancelled subscription.
pub const CANCELLED: &str = SubscriptionState::Cancelled.as_str();
/// The unique index that keeps one subscription in force per customer.
pub const ACTIVE_CUSTOMER_INDEX: &str = "subscriptions_active_customer";

/// A row of `subscriptions`.
#[derive(sqlx::FromRow, serde::Serialize, Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionRow {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub plan: String,
    pub monthly_requests: i64,
    pub requests_per_second: i32,
    pub status: String,
    pub k8s_namespace: String,
    pub k8s_name: String,
    pub k8s_uid: String,
    pub generation: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub cancelled_at: Option<DateTime<Utc>>,
    /// The digest of the record as planned by the operator's last write (migration 0010).
    #[serde(skip)]
    pub plan_digest: Option<String>,
}

/// The values the operator writes; everything else is bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionRecord {
    pub customer_id: Uuid,
    pub plan: String,
    pub monthly_requests: i64,
    pub requests_per_second: i32,
    pub k8s: K8sRef,
    pub generation: i64,
}

impl Recorded for SubscriptionRow {
    type Record = SubscriptionRecord;
    fn id(&self) -> Uuid {
        self.id
    }
    fn record(&self) -> SubscriptionRecord {
        SubscriptionRecord {
            customer_id: self.customer_id,
            plan: self.plan.clone(),
            monthly_requests: self.monthly_requests,
            requests_per_second: self.requests_per_second,
            k8s: K8sRef::from_columns(&self.k8s_namespace, &self.k8s_name, &self.k8s_uid),
            generation: self.generation,
        }
    }
    fn plan_digest(&self) -> Option<String> {
        self.plan_digest.clone()
    }
}

impl Digested for SubscriptionRecord {
    fn digest(&self) -> String {
        RowDigest::default()
            .uuid(self.customer_id)
            .text(&self.plan)
            .int(self.monthly_requests)
            .int(i64::from(self.requests_per_second))
            .text(&self.k8s.namespace)
            .text(&self.k8s.name)
            .text(&self.k8s.uid)
            .int(self.generation)
            .finish()
    }
}

pub(super) const COLUMNS: &str = "id, customer_id, plan, monthly_requests, requests_per_second, status, \
                       k8s_namespace, k8s_name, k8s_uid, generation, created_at, updated_at, \
                       cancelled_at, plan_digest";

// Filters of the per-object lookups, shared with `super::hot_queries` (the EXPLAIN test).
pub(super) const LIVE_BY_K8S_REF: &str =
    "WHERE k8s_namespace = $1 AND k8s_name = $2 AND cancelled_at IS NULL";
pub(super) const LIVE_BY_CUSTOMER: &str = "WHERE customer_id = $1 AND cancelled_at IS NULL";

/// The live row of a resource, locked for the rest of the transaction.
pub async fn lock_live_by_k8s_ref(
    tx: &mut PgConnection,
    namespace: &str,
    name: &str,
) -> Result<Option<SubscriptionRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions {LIVE_BY_K8S_REF} FOR UPDATE"
    ))
    .bind(namespace)
    .bind(name)
    .fetch_optional(tx)
    .await
}

/// The subscription in force for a customer, locked for the rest of the transaction.
pub async fn lock_live_by_customer(
    tx: &mut PgConnection,
    customer_id: Uuid,
) -> Result<Option<SubscriptionRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions {LIVE_BY_CUSTOMER} FOR UPDATE"
    ))
    .bind(customer_id)
    .fetch_optional(tx)
    .await
}

/// The subscription in force for a customer, unlocked (for the etcd sync).
pub async fn live_by_customer<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    customer_id: Uuid,
) -> Result<Option<SubscriptionRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions {LIVE_BY_CUSTOMER}"
    ))
    .bind(customer_id)
    .fetch_optional(db)
    .await
}

/// Up to `limit` subscriptions in force of live customers (what etcd publishes) with a
/// customer id above `after`, in customer id order (keyset pagination).
pub async fn live_page_of_live_customers<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<SubscriptionRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions s WHERE s.cancelled_at IS NULL \
         AND ($1::uuid IS NULL OR s.customer_id > $1) AND EXISTS \
         (SELECT 1 FROM customers c WHERE c.id = s.customer_id AND c.deleted_at IS NULL) \
         ORDER BY s.customer_id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The subscriptions in force of the customers among `customer_ids`.
pub async fn live_by_customers<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    customer_ids: &[Uuid],
) -> Result<Vec<SubscriptionRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE customer_id = ANY($1) AND cancelled_at IS NULL"
    ))
    .bind(customer_ids)
    .fetch_all(db)
    .await
}

/// The live row of a resource, unlocked.
pub async fn live_by_k8s_ref<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    namespace: &str,
    name: &str,
) -> Result<Option<SubscriptionRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions {LIVE_BY_K8S_REF}"
    ))
    .bind(namespace)
    .bind(name)
    .fetch_optional(db)
    .await
}

/// Inserts a new row in force.
pub async fn insert(
    tx: &mut PgConnection,
    id: Uuid,
    rec: &SubscriptionRecord,
) -> Result<SubscriptionRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO subscriptions (id, customer_id, plan, monthly_requests, requests_per_second, \
         status, k8s_namespace, k8s_name, k8s_uid, generation, plan_digest) \
         VALUES ($1, $2, $3, $4, $5, '{ACTIVE}', $6, $7, $8, $9, $10) RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(rec.customer_id)
    .bind(&rec.plan)
    .bind(rec.monthly_requests)
    .bind(rec.requests_per_second)
    .bind(&rec.k8s.namespace)
    .bind(&rec.k8s.name)
    .bind(&rec.k8s.uid)
    .bind(rec.generation)
    .bind(rec.digest())
    .fetch_one(tx)
    .await
}

/// Overwrites a live row with the record (also re-points an adopted row).
pub async fn update(
    tx: &mut PgConnection,
    id: Uuid,
    rec: &SubscriptionRecord,
) -> Result<SubscriptionRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE subscriptions SET customer_id = $2, plan = $3, monthly_requests = $4, \
         requests_per_second = $5, k8s_namespace = $6, k8s_name = $7, k8s_uid = $8, \
         generation = $9, plan_digest = $10, updated_at = now(), orphaned_at = NULL WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(rec.customer_id)
    .bind(&rec.plan)
    .bind(rec.monthly_requests)
    .bind(rec.requests_per_second)
    .bind(&rec.k8s.namespace)
    .bind(&rec.k8s.name)
    .bind(&rec.k8s.uid)
    .bind(rec.generation)
    .bind(rec.digest())
    .fetch_one(tx)
    .await
}

/// Cancels a row; it is kept for history.
pub async fn mark_cancelled(
    tx: &mut PgConnection,
    id: Uuid,
) -> Result<SubscriptionRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE subscriptions SET status = '{CANCELLED}', cancelled_at = now(), \
         updated_at = now() WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_one(tx)
    .await
}

//! The `customers` table: where a Customer resource becomes a row.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use m3o_crds::CustomerStatusState;
use sqlx::PgConnection;
use sqlx::types::Json;
use uuid::Uuid;

use crate::pipeline::k8s_ref::K8sRef;
use crate::pipeline::row_plan::{Digested, Recorded, RowDigest};

/// A row of `customers`.
#[derive(sqlx::FromRow, serde::Serialize, Clone, Debug, PartialEq)]
pub struct CustomerRow {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub status: String,
    pub meta: Json<BTreeMap<String, String>>,
    pub k8s_namespace: String,
    pub k8s_name: String,
    pub k8s_uid: String,
    pub generation: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// The digest of the record as planned by the operator's last write (migration 0010).
    #[serde(skip)]
    pub plan_digest: Option<String>,
}

/// The values the operator writes; everything else is bookkeeping.
#[derive(Clone, Debug, PartialEq)]
pub struct CustomerRecord {
    pub email: String,
    pub name: String,
    pub status: String,
    pub meta: BTreeMap<String, String>,
    pub k8s: K8sRef,
    pub generation: i64,
}

impl Recorded for CustomerRow {
    type Record = CustomerRecord;
    fn id(&self) -> Uuid {
        self.id
    }
    fn record(&self) -> CustomerRecord {
        CustomerRecord {
            email: self.email.clone(),
            name: self.name.clone(),
            status: self.status.clone(),
            meta: self.meta.0.clone(),
            k8s: K8sRef::from_columns(&self.k8s_namespace, &self.k8s_name, &self.k8s_uid),
            generation: self.generation,
        }
    }
    fn plan_digest(&self) -> Option<String> {
        self.plan_digest.clone()
    }
}

impl Digested for CustomerRecord {
    fn digest(&self) -> String {
        RowDigest::default()
            .text(&self.email)
            .text(&self.name)
            .text(&self.status)
            .map(&self.meta)
            .text(&self.k8s.namespace)
            .text(&self.k8s.name)
            .text(&self.k8s.uid)
            .int(self.generation)
            .finish()
    }
}

pub(super) const COLUMNS: &str = "id, email, name, status, meta, k8s_namespace, k8s_name, k8s_uid, \
                       generation, created_at, updated_at, deleted_at, plan_digest";

// Filters of the per-object lookups, shared with `super::hot_queries` (the EXPLAIN test).
pub(super) const LIVE_BY_K8S_REF: &str =
    "WHERE k8s_namespace = $1 AND k8s_name = $2 AND deleted_at IS NULL";
pub(super) const BY_ID: &str = "WHERE id = $1";
pub(super) const LIVE_BY_ID: &str = "WHERE id = $1 AND deleted_at IS NULL";
pub(super) const LIVE_BY_EMAIL: &str = "WHERE lower(email) = lower($1) AND deleted_at IS NULL";
pub(super) const LATEST_BY_K8S_REF: &str =
    "WHERE k8s_namespace = $1 AND k8s_name = $2 ORDER BY created_at DESC LIMIT 1";

/// The live row of a resource, locked for the rest of the transaction.
pub async fn lock_live_by_k8s_ref(
    tx: &mut PgConnection,
    namespace: &str,
    name: &str,
) -> Result<Option<CustomerRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM customers {LIVE_BY_K8S_REF} FOR UPDATE"
    ))
    .bind(namespace)
    .bind(name)
    .fetch_optional(tx)
    .await
}

/// A row by id (live or deleted), locked for the rest of the transaction.
pub async fn lock_by_id(
    tx: &mut PgConnection,
    id: Uuid,
) -> Result<Option<CustomerRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM customers {BY_ID} FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(tx)
    .await
}

/// Locks a live row against deletion (FOR SHARE) for the rest of the transaction: a
/// dependent's record is written only while its customer is live. Taken before the
/// dependent's own rows, the order the customer's cleanup locks them in.
pub async fn lock_live_shared(
    tx: &mut PgConnection,
    id: Uuid,
) -> Result<Option<CustomerRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM customers {LIVE_BY_ID} FOR SHARE"
    ))
    .bind(id)
    .fetch_optional(tx)
    .await
}

/// A live row by id, unlocked (for readers such as the etcd sync).
pub async fn live_by_id<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    id: Uuid,
) -> Result<Option<CustomerRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM customers {LIVE_BY_ID}"))
        .bind(id)
        .fetch_optional(db)
        .await
}

/// Up to `limit` live rows with an id above `after`, in id order (keyset pagination,
/// so a scan of the whole table holds one page at a time).
pub async fn live_page<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<CustomerRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM customers WHERE deleted_at IS NULL AND ($1::uuid IS NULL OR id > $1) \
         ORDER BY id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The live rows among `ids`.
pub async fn live_by_ids<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    ids: &[Uuid],
) -> Result<Vec<CustomerRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM customers WHERE id = ANY($1) AND deleted_at IS NULL"
    ))
    .bind(ids)
    .fetch_all(db)
    .await
}

/// The live row of a resource, unlocked.
pub async fn live_by_k8s_ref<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    namespace: &str,
    name: &str,
) -> Result<Option<CustomerRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM customers {LIVE_BY_K8S_REF}"
    ))
    .bind(namespace)
    .bind(name)
    .fetch_optional(db)
    .await
}

/// The resource holding an email among live customers, for a Conflict message.
pub async fn live_email_holder<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    email: &str,
) -> Result<Option<K8sRef>, sqlx::Error> {
    let row: Option<(String, String, String)> = sqlx::query_as(&format!(
        "SELECT k8s_namespace, k8s_name, k8s_uid FROM customers {LIVE_BY_EMAIL}"
    ))
    .bind(email)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(namespace, name, uid)| K8sRef::from_columns(&namespace, &name, &uid)))
}

/// Inserts a new live row.
pub async fn insert(
    tx: &mut PgConnection,
    id: Uuid,
    rec: &CustomerRecord,
) -> Result<CustomerRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO customers (id, email, name, status, meta, k8s_namespace, k8s_name, k8s_uid, generation, \
         plan_digest) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(&rec.email)
    .bind(&rec.name)
    .bind(&rec.status)
    .bind(Json(&rec.meta))
    .bind(&rec.k8s.namespace)
    .bind(&rec.k8s.name)
    .bind(&rec.k8s.uid)
    .bind(rec.generation)
    .bind(rec.digest())
    .fetch_one(tx)
    .await
}

/// Overwrites a row with the record (also revives and re-points an adopted row).
pub async fn update(
    tx: &mut PgConnection,
    id: Uuid,
    rec: &CustomerRecord,
) -> Result<CustomerRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE customers SET email = $2, name = $3, status = $4, meta = $5, k8s_namespace = $6, \
         k8s_name = $7, k8s_uid = $8, generation = $9, plan_digest = $10, updated_at = now(), orphaned_at = NULL \
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(&rec.email)
    .bind(&rec.name)
    .bind(&rec.status)
    .bind(Json(&rec.meta))
    .bind(&rec.k8s.namespace)
    .bind(&rec.k8s.name)
    .bind(&rec.k8s.uid)
    .bind(rec.generation)
    .bind(rec.digest())
    .fetch_one(tx)
    .await
}

/// Marks a row deleted; the row is kept for history.
pub async fn mark_deleted(tx: &mut PgConnection, id: Uuid) -> Result<CustomerRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE customers SET status = $2, deleted_at = now(), updated_at = now() \
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(CustomerStatusState::Deleted.as_str())
    .fetch_one(tx)
    .await
}

/// A row by id, live or deleted (for events about a deleted customer's keys).
pub async fn by_id<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    id: Uuid,
) -> Result<Option<CustomerRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM customers {BY_ID}"))
        .bind(id)
        .fetch_optional(db)
        .await
}

/// The newest row of a resource, live or deleted (cleanup after lost status).
pub async fn latest_by_k8s_ref<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    namespace: &str,
    name: &str,
) -> Result<Option<CustomerRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM customers {LATEST_BY_K8S_REF}"
    ))
    .bind(namespace)
    .bind(name)
    .fetch_optional(db)
    .await
}

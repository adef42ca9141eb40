//! The `api_keys` table: one row per key ever issued to an ApiKey resource, by hash.

use chrono::{DateTime, Utc};
use m3o_crds::ApiKeyState;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::pipeline::k8s_ref::K8sRef;
use crate::pipeline::row_plan::{Digested, RowDigest};

const REVOKED: &str = ApiKeyState::Revoked.as_str();

/// A row of `api_keys`.
#[derive(sqlx::FromRow, serde::Serialize, Clone, Debug, PartialEq)]
pub struct ApiKeyRow {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub key_hash: String,
    pub key_prefix: String,
    pub scopes: Vec<String>,
    pub status: String,
    pub description: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub k8s_namespace: String,
    pub k8s_name: String,
    pub k8s_uid: String,
    pub generation: i64,
    pub rotation_generation: i64,
    pub grace_until: Option<DateTime<Utc>>,
    pub blocked_message: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The digest of the fields as planned by the operator's last write (migration 0010).
    #[serde(skip)]
    pub plan_digest: Option<String>,
}

/// A key to record: everything but the plaintext.
#[derive(Clone, Debug, PartialEq)]
pub struct NewApiKey {
    pub id: Uuid,
    pub key_prefix: String,
    pub fields: ApiKeyFields,
    pub k8s: K8sRef,
}

/// The fields of a key row a reconcile writes: what its plan decides, and its identity
/// (owner, hash, rotation generation), so a hand edit of either is repaired.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiKeyFields {
    pub customer_id: Uuid,
    pub key_hash: String,
    pub rotation_generation: i64,
    pub scopes: Vec<String>,
    pub status: String,
    pub description: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub grace_until: Option<DateTime<Utc>>,
    /// `spec.blockedMessage` while the key is blocked by spec, else empty.
    pub blocked_message: String,
    pub generation: i64,
}

/// The digest covers the fields a reconcile writes ([`ApiKeyFields`]): what it
/// repairs. (The identity was added later: rows digested before it differ once after
/// the upgrade, one reconcile per key; see the README's upgrade notes.)
impl Digested for ApiKeyFields {
    fn digest(&self) -> String {
        RowDigest::default()
            .text(&self.customer_id.to_string())
            .text(&self.key_hash)
            .int(self.rotation_generation)
            .texts(self.scopes.iter())
            .text(&self.status)
            .text(&self.description)
            .time(self.expires_at)
            .time(self.grace_until)
            .text(&self.blocked_message)
            .int(self.generation)
            .finish()
    }
}

impl ApiKeyRow {
    /// Whether the row holds other fields than its last write planned (edited by hand,
    /// or written before digests).
    pub fn differs_from_plan(&self) -> bool {
        self.plan_digest.as_deref() != Some(self.fields().digest().as_str())
    }

    pub fn fields(&self) -> ApiKeyFields {
        ApiKeyFields {
            customer_id: self.customer_id,
            key_hash: self.key_hash.clone(),
            rotation_generation: self.rotation_generation,
            scopes: self.scopes.clone(),
            status: self.status.clone(),
            description: self.description.clone(),
            expires_at: self.expires_at,
            grace_until: self.grace_until,
            blocked_message: self.blocked_message.clone(),
            generation: self.generation,
        }
    }
}

pub(super) const COLUMNS: &str = "id, customer_id, key_hash, key_prefix, scopes, status, description, expires_at, \
                       k8s_namespace, k8s_name, k8s_uid, generation, rotation_generation, grace_until, \
                       blocked_message, created_at, updated_at, revoked_at, plan_digest";

// Filters of the per-object lookups, shared with `super::hot_queries` (the EXPLAIN test).
pub(super) const LIVE_FOR_RESOURCE: &str =
    "WHERE k8s_namespace = $1 AND k8s_name = $2 AND revoked_at IS NULL ORDER BY created_at, id";
pub(super) const ALL_FOR_RESOURCE: &str =
    "WHERE k8s_namespace = $1 AND k8s_name = $2 ORDER BY created_at";
pub(super) const LIVE_BY_HASH: &str = "WHERE key_hash = $1 AND revoked_at IS NULL";
pub(super) const ALL_FOR_CUSTOMER: &str = "WHERE customer_id = $1";
pub(super) const CONFIG_LIVE_FOR_CUSTOMER: &str = "WHERE customer_id = $1 AND NOT config_gone";

/// The unrevoked keys of a resource, locked for the rest of the transaction.
pub async fn lock_live_for_resource(
    tx: &mut PgConnection,
    namespace: &str,
    name: &str,
) -> Result<Vec<ApiKeyRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM api_keys {LIVE_FOR_RESOURCE} FOR UPDATE"
    ))
    .bind(namespace)
    .bind(name)
    .fetch_all(tx)
    .await
}

/// Every key (revoked too) of a resource, unlocked, newest last.
pub async fn all_for_resource<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    namespace: &str,
    name: &str,
) -> Result<Vec<ApiKeyRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM api_keys {ALL_FOR_RESOURCE}"
    ))
    .bind(namespace)
    .bind(name)
    .fetch_all(db)
    .await
}

/// Every key (revoked too) of the resources `namespaces[i]/names[i]`.
pub async fn all_for_resources<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    namespaces: &[String],
    names: &[String],
) -> Result<Vec<ApiKeyRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM api_keys WHERE (k8s_namespace, k8s_name) IN \
         (SELECT * FROM unnest($1::text[], $2::text[])) ORDER BY created_at"
    ))
    .bind(namespaces)
    .bind(names)
    .fetch_all(db)
    .await
}

/// An unrevoked key by hash.
pub async fn live_by_hash<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    hash: &str,
) -> Result<Option<ApiKeyRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM api_keys {LIVE_BY_HASH}"))
        .bind(hash)
        .fetch_optional(db)
        .await
}

/// Up to `limit` unrevoked keys with a hash above `after`, in byte order of the hash
/// (the order of their etcd keys; keyset pagination).
pub async fn live_page<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<ApiKeyRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM api_keys WHERE revoked_at IS NULL \
         AND ($1::text IS NULL OR key_hash COLLATE \"C\" > $1) \
         ORDER BY key_hash COLLATE \"C\" LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Every key (revoked too) of a customer.
pub async fn all_for_customer<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    customer_id: Uuid,
) -> Result<Vec<ApiKeyRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM api_keys {ALL_FOR_CUSTOMER}"
    ))
    .bind(customer_id)
    .fetch_all(db)
    .await
}

/// The keys of a customer whose gateway entry may still exist: every key but those
/// [`mark_config_gone`] marked (served by a partial index on `NOT config_gone`).
pub async fn config_live_for_customer<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    customer_id: Uuid,
) -> Result<Vec<ApiKeyRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM api_keys {CONFIG_LIVE_FOR_CUSTOMER}"
    ))
    .bind(customer_id)
    .fetch_all(db)
    .await
}

/// The rows of the hashes `$1`, locked oldest first: the order in which a reconcile
/// locks a resource's rows ([`lock_live_for_resource`]), so the two never deadlock.
const LOCK_IN_ORDER: &str =
    "SELECT id FROM api_keys WHERE key_hash = ANY($1) ORDER BY created_at, id FOR UPDATE";

/// Marks keys retired for good whose entry is confirmed absent from etcd: convergence
/// no longer reads them. A later [`update`] of a row clears its mark.
pub async fn mark_config_gone(tx: &mut PgConnection, hashes: &[String]) -> Result<(), sqlx::Error> {
    // Still retired when marked: a row written again since it was read is not.
    sqlx::query(&format!(
        "UPDATE api_keys SET config_gone = true WHERE id IN ({}) AND NOT config_gone \
         AND (revoked_at IS NOT NULL OR status = 'revoked' OR grace_until <= now())",
        LOCK_IN_ORDER
    ))
    .bind(hashes)
    .execute(tx)
    .await?;
    Ok(())
}

pub async fn insert(tx: &mut PgConnection, key: &NewApiKey) -> Result<ApiKeyRow, sqlx::Error> {
    let f = &key.fields;
    sqlx::query_as(&format!(
        "INSERT INTO api_keys (id, customer_id, key_hash, key_prefix, scopes, status, description, expires_at, \
         k8s_namespace, k8s_name, k8s_uid, generation, rotation_generation, grace_until, blocked_message, \
         plan_digest) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
         RETURNING {COLUMNS}"
    ))
    .bind(key.id)
    .bind(f.customer_id)
    .bind(&f.key_hash)
    .bind(&key.key_prefix)
    .bind(&f.scopes)
    .bind(&f.status)
    .bind(&f.description)
    .bind(f.expires_at)
    .bind(&key.k8s.namespace)
    .bind(&key.k8s.name)
    .bind(&key.k8s.uid)
    .bind(f.generation)
    .bind(f.rotation_generation)
    .bind(f.grace_until)
    .bind(&f.blocked_message)
    .bind(f.digest())
    .fetch_one(tx)
    .await
}

/// Overwrites the mutable fields; a `revoked` status also stamps `revoked_at`.
pub async fn update(
    tx: &mut PgConnection,
    id: Uuid,
    f: &ApiKeyFields,
) -> Result<ApiKeyRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE api_keys SET scopes = $2, status = $3, description = $4, expires_at = $5, grace_until = $6, \
         generation = $7, blocked_message = $8, plan_digest = $9, customer_id = $10, key_hash = $11, \
         rotation_generation = $12, updated_at = now(), config_gone = false, orphaned_at = NULL, \
         revoked_at = CASE WHEN $3 = '{REVOKED}' THEN coalesce(revoked_at, now()) ELSE NULL END \
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(&f.scopes)
    .bind(&f.status)
    .bind(&f.description)
    .bind(f.expires_at)
    .bind(f.grace_until)
    .bind(f.generation)
    .bind(&f.blocked_message)
    .bind(f.digest())
    .bind(f.customer_id)
    .bind(&f.key_hash)
    .bind(f.rotation_generation)
    .fetch_one(tx)
    .await
}

/// Served by the expression index `api_keys_next_clock_change` (ORDER BY + LIMIT, not
/// an aggregate over every live key).
pub const NEXT_CLOCK_CHANGE: &str = "SELECT least(expires_at, grace_until) FROM api_keys \
     WHERE revoked_at IS NULL AND least(expires_at, grace_until) > $1 \
     ORDER BY least(expires_at, grace_until) LIMIT 1";

/// The next time after `after` a key's gateway entry changes by the clock alone (an
/// expiry or the end of a rotation's grace period), if any.
pub async fn next_clock_change<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    after: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(NEXT_CLOCK_CHANGE)
        .bind(after)
        .fetch_optional(db)
        .await
}

/// Served by the same index: the customers with a key whose entry changes by the clock
/// in `($1, $2]` (an expiry or the end of a grace period).
pub const CUSTOMERS_CROSSING: &str = "SELECT DISTINCT customer_id FROM api_keys \
     WHERE revoked_at IS NULL AND least(expires_at, grace_until) > $1 \
     AND least(expires_at, grace_until) <= $2";

/// The customers with a key whose gateway entry changed by the clock in `(after, until]`.
pub async fn customers_crossing<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    after: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(CUSTOMERS_CROSSING)
        .bind(after)
        .bind(until)
        .fetch_all(db)
        .await
}

/// Raises the recorded etcd revision of these keys' gateway entries to `revision` (a
/// write's, or a convergence's floor: see `platform::sync`; for `GatewaySynced`). Never
/// lowers it; rows already at or above it are neither written nor locked.
pub async fn record_config_revision(
    tx: &mut PgConnection,
    hashes: &[String],
    revision: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE api_keys SET config_revision = $2 WHERE id IN (\
         SELECT id FROM api_keys WHERE key_hash = ANY($1) \
           AND (config_revision IS NULL OR config_revision < $2) \
         ORDER BY created_at, id FOR UPDATE)",
    )
    .bind(hashes)
    .bind(revision)
    .execute(tx)
    .await?;
    Ok(())
}

/// The latest recorded entry write of any key (rotated-out ones included) of a resource.
pub async fn max_config_revision_for_resource<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    namespace: &str,
    name: &str,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT max(config_revision) FROM api_keys WHERE k8s_namespace = $1 AND k8s_name = $2",
    )
    .bind(namespace)
    .bind(name)
    .fetch_one(db)
    .await
}

//! The records of resources that are gone (recovery rule): live records read a page at
//! a time, and the mark of a record left in place by deletionPolicy Orphan
//! (migration `0012_orphaned_records.sql`).

use sqlx::PgConnection;
use uuid::Uuid;

/// Records read per statement.
pub const PAGE: i64 = 500;

/// A kind's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Customers,
    Subscriptions,
    ApiKeys,
}

impl Table {
    /// The table of a kind (`Customer`, `Subscription`, `ApiKey`).
    pub fn of_kind(kind: &str) -> Option<Self> {
        match kind {
            "Customer" => Some(Self::Customers),
            "Subscription" => Some(Self::Subscriptions),
            "ApiKey" => Some(Self::ApiKeys),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Customers => "customers",
            Self::Subscriptions => "subscriptions",
            Self::ApiKeys => "api_keys",
        }
    }

    /// What makes a record of the table live.
    fn live(self) -> &'static str {
        match self {
            Self::Customers => "deleted_at IS NULL",
            Self::Subscriptions => "cancelled_at IS NULL",
            Self::ApiKeys => "revoked_at IS NULL",
        }
    }

    fn customer_column(self) -> &'static str {
        match self {
            Self::Customers => "id",
            Self::Subscriptions | Self::ApiKeys => "customer_id",
        }
    }
}

/// A live record, by the resource it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct LiveRecord {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub k8s_namespace: String,
    pub k8s_name: String,
}

/// Up to [`PAGE`] live records of `table` not marked orphaned, after record `after`,
/// in `namespace` when given, in id order.
pub async fn live_page<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    table: Table,
    namespace: Option<&str>,
    after: Option<Uuid>,
) -> Result<Vec<LiveRecord>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT id, {customer} AS customer_id, k8s_namespace, k8s_name FROM {table} \
         WHERE {live} AND orphaned_at IS NULL \
           AND ($1::uuid IS NULL OR id > $1) AND ($2::text IS NULL OR k8s_namespace = $2) \
         ORDER BY id LIMIT {PAGE}",
        customer = table.customer_column(),
        table = table.name(),
        live = table.live(),
    ))
    .bind(after)
    .bind(namespace)
    .fetch_all(db)
    .await
}

/// Marks the live records of resource `namespace/name` as left in place by
/// deletionPolicy Orphan.
pub async fn mark_orphaned(
    tx: &mut PgConnection,
    table: Table,
    namespace: &str,
    name: &str,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(&format!(
        "UPDATE {table} SET orphaned_at = now() \
         WHERE k8s_namespace = $1 AND k8s_name = $2 AND {live} AND orphaned_at IS NULL",
        table = table.name(),
        live = table.live(),
    ))
    .bind(namespace)
    .bind(name)
    .execute(tx)
    .await?;
    Ok(done.rows_affected())
}

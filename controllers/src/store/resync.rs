//! What the bulk comparison ([`crate::runtime::resync`]) reads: the live records of a
//! page of resources, in one statement per page, and whether each still holds what its
//! last write planned (the digest of migration 0010).

use std::collections::HashMap;

use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{api_keys, customers, subscriptions};
use crate::pipeline::row_plan::{Digested, Recorded};

/// A table of records kept per resource, and what makes a record live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordTable {
    pub table: &'static str,
    pub live: &'static str,
}

pub const CUSTOMERS: RecordTable = RecordTable {
    table: "customers",
    live: "deleted_at IS NULL",
};
pub const SUBSCRIPTIONS: RecordTable = RecordTable {
    table: "subscriptions",
    live: "cancelled_at IS NULL",
};
pub const API_KEYS: RecordTable = RecordTable {
    table: "api_keys",
    live: "revoked_at IS NULL",
};

/// What the comparison learns of one resource's live records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveRecords {
    /// A live record's content differs from the digest its last write stored: edited
    /// by hand (or written before digests).
    pub edited: bool,
    /// The digest stored with the resource's live record (one-row kinds).
    pub plan_digest: Option<String>,
    /// The customer the live record belongs to (Subscription).
    pub customer_id: Option<Uuid>,
    /// The version of each live record ([`RowVersions`]), in id order.
    pub versions: RowVersions,
}

/// The resource a row belongs to.
pub type ResourceKey = (String, String);

/// Each live record of a resource by id, with its version: Postgres's `xmin`, the
/// transaction that wrote this version of the row, which every write changes (a restore
/// from a dump too). Transaction ids grow on one server; a physical restore or a
/// failover may hand out ids again, so versions are compared only within one server
/// run ([`server_run`]). A record read again at the same version holds the same
/// content. In id order.
pub type RowVersions = Vec<(Uuid, i64)>;

/// The SQL of [`live_records`] (also EXPLAINed by the hot-query test): whole rows, since
/// the current content is digested in Rust, the way its plan was; and each row's
/// version.
pub fn live_records_sql(records: RecordTable) -> String {
    let columns = match records.table {
        "customers" => customers::COLUMNS,
        "subscriptions" => subscriptions::COLUMNS,
        _ => api_keys::COLUMNS,
    };
    format!(
        "SELECT {columns}, xmin::text::int8 AS row_version FROM {} WHERE {} AND \
         (k8s_namespace, k8s_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        records.table, records.live
    )
}

/// The SQL of [`row_versions`] (EXPLAINed by the hot-query test): the same rows as
/// [`live_records_sql`], each named by its resource's place in the arrays (1-based),
/// with its id and version: no text to decode.
pub fn row_versions_sql(records: RecordTable) -> String {
    format!(
        "SELECT r.i, t.id, t.xmin::text::int8 AS row_version \
         FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS r(namespace, name, i) \
         JOIN {} t ON t.k8s_namespace = r.namespace AND t.k8s_name = r.name WHERE t.{}",
        records.table, records.live
    )
}

/// The live records of the resources `namespaces[i]/names[i]`, by resource; a resource
/// without one is absent.
pub async fn live_records(
    db: &PgPool,
    records: RecordTable,
    namespaces: &[String],
    names: &[String],
) -> Result<HashMap<ResourceKey, LiveRecords>, sqlx::Error> {
    let sql = live_records_sql(records);
    let mut found: HashMap<ResourceKey, LiveRecords> = HashMap::new();
    if records == CUSTOMERS {
        for (row, version) in fetch::<customers::CustomerRow>(db, &sql, namespaces, names).await? {
            let key = (row.k8s_namespace.clone(), row.k8s_name.clone());
            found.insert(key, one_row(&row, None, version));
        }
    } else if records == SUBSCRIPTIONS {
        let rows = fetch::<subscriptions::SubscriptionRow>(db, &sql, namespaces, names).await?;
        for (row, version) in rows {
            let key = (row.k8s_namespace.clone(), row.k8s_name.clone());
            found.insert(key, one_row(&row, Some(row.customer_id), version));
        }
    } else {
        for (row, version) in fetch::<api_keys::ApiKeyRow>(db, &sql, namespaces, names).await? {
            let key = (row.k8s_namespace.clone(), row.k8s_name.clone());
            let entry = found.entry(key).or_default();
            entry.edited |= row.differs_from_plan();
            entry.customer_id = Some(row.customer_id);
            entry.versions.push((row.id, version));
        }
        for entry in found.values_mut() {
            entry.versions.sort_unstable();
        }
    }
    Ok(found)
}

/// The live records of a resource: its records' versions, or `None` without a live one.
/// What tells, without reading them, that records are as last compared.
pub async fn row_versions(
    db: &PgPool,
    records: RecordTable,
    namespaces: &[String],
    names: &[String],
) -> Result<Vec<Option<RowVersions>>, sqlx::Error> {
    let rows: Vec<(i64, Uuid, i64)> = sqlx::query_as(&row_versions_sql(records))
        .bind(namespaces)
        .bind(names)
        .fetch_all(db)
        .await?;
    let mut found: Vec<Option<RowVersions>> = vec![None; names.len()];
    for (i, id, version) in rows {
        let slot = usize::try_from(i - 1).ok().and_then(|i| found.get_mut(i));
        if let Some(slot) = slot {
            slot.get_or_insert_with(Vec::new).push((id, version));
        }
    }
    for versions in found.iter_mut().flatten() {
        versions.sort_unstable();
    }
    Ok(found)
}

/// When the Postgres server answering started: a restore or a failover (which may reuse
/// transaction ids, and so row versions) starts another run.
pub async fn server_run(db: &PgPool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_postmaster_start_time()::text")
        .fetch_one(db)
        .await
}

/// The rows of `sql` (a [`live_records_sql`]) with their versions.
async fn fetch<R>(
    db: &PgPool,
    sql: &str,
    namespaces: &[String],
    names: &[String],
) -> Result<Vec<(R, i64)>, sqlx::Error>
where
    R: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
{
    let rows = sqlx::query(sql)
        .bind(namespaces)
        .bind(names)
        .fetch_all(db)
        .await?;
    rows.iter()
        .map(|row| Ok((R::from_row(row)?, row.try_get("row_version")?)))
        .collect()
}

/// The comparison's view of the one live row of a one-row kind.
fn one_row<R: Recorded>(row: &R, customer_id: Option<Uuid>, version: i64) -> LiveRecords {
    let stored = row.plan_digest();
    LiveRecords {
        edited: stored.as_deref() != Some(row.record().digest().as_str()),
        plan_digest: stored,
        customer_id,
        versions: vec![(row.id(), version)],
    }
}

//! What the bulk resync ([`crate::runtime::resync`]) reads: which of a page of resources have a
//! live record, in one statement per page.

use std::collections::HashSet;

use sqlx::PgPool;

/// A table of records kept per resource, and what makes a record live.
#[derive(Clone, Copy, Debug)]
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

/// The SQL of [`live_refs`] (also EXPLAINed by the hot-query test).
pub fn live_refs_sql(records: RecordTable) -> String {
    format!(
        "SELECT DISTINCT k8s_namespace, k8s_name FROM {} WHERE {} AND \
         (k8s_namespace, k8s_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        records.table, records.live
    )
}

/// Which of the resources `namespaces[i]/names[i]` have a live record.
pub async fn live_refs(
    db: &PgPool,
    records: RecordTable,
    namespaces: &[String],
    names: &[String],
) -> Result<HashSet<(String, String)>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(&live_refs_sql(records))
        .bind(namespaces)
        .bind(names)
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().collect())
}

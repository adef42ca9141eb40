//! What the bulk comparison ([`crate::runtime::resync`]) reads: the live records of a
//! page of resources, in one statement per page, and whether each still holds what its
//! last write planned (the digest of migration 0010).

use std::collections::HashMap;

use sqlx::PgPool;
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
}

/// The resource a row belongs to.
pub type ResourceKey = (String, String);

/// The SQL of [`live_records`] (also EXPLAINed by the hot-query test): whole rows, since
/// the current content is digested in Rust, the way its plan was.
pub fn live_records_sql(records: RecordTable) -> String {
    let columns = match records.table {
        "customers" => customers::COLUMNS,
        "subscriptions" => subscriptions::COLUMNS,
        _ => api_keys::COLUMNS,
    };
    format!(
        "SELECT {columns} FROM {} WHERE {} AND \
         (k8s_namespace, k8s_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
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
        let rows: Vec<customers::CustomerRow> = sqlx::query_as(&sql)
            .bind(namespaces)
            .bind(names)
            .fetch_all(db)
            .await?;
        for row in rows {
            let key = (row.k8s_namespace.clone(), row.k8s_name.clone());
            found.insert(key, one_row(&row, None));
        }
    } else if records == SUBSCRIPTIONS {
        let rows: Vec<subscriptions::SubscriptionRow> = sqlx::query_as(&sql)
            .bind(namespaces)
            .bind(names)
            .fetch_all(db)
            .await?;
        for row in rows {
            let key = (row.k8s_namespace.clone(), row.k8s_name.clone());
            found.insert(key, one_row(&row, Some(row.customer_id)));
        }
    } else {
        let rows: Vec<api_keys::ApiKeyRow> = sqlx::query_as(&sql)
            .bind(namespaces)
            .bind(names)
            .fetch_all(db)
            .await?;
        for row in rows {
            let key = (row.k8s_namespace.clone(), row.k8s_name.clone());
            let entry = found.entry(key).or_default();
            entry.edited |= row.differs_from_plan();
            entry.customer_id = Some(row.customer_id);
        }
    }
    Ok(found)
}

/// The comparison's view of the one live row of a one-row kind.
fn one_row<R: Recorded>(row: &R, customer_id: Option<Uuid>) -> LiveRecords {
    let stored = row.plan_digest();
    LiveRecords {
        edited: stored.as_deref() != Some(row.record().digest().as_str()),
        plan_digest: stored,
        customer_id,
    }
}

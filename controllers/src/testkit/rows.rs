//! Rows as the store returns them, for plan and build tests: one live record of each
//! table with every field set, to adjust with struct update syntax; and the conditions
//! of an object's status.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use m3o_crds::Condition;
use sqlx::types::Json;
use uuid::Uuid;

use crate::report::status::{Cond, merge, types};
use crate::store::api_keys::ApiKeyRow;
use crate::store::customers::CustomerRow;
use crate::store::subscriptions::SubscriptionRow;

/// A fixed point in time, so rows compare equal across calls.
pub const T0: DateTime<Utc> = DateTime::UNIX_EPOCH;

/// A live customer `ns/c` with `status` (`active`, `banned`, ...), id nil.
pub fn customer_row(status: &str) -> CustomerRow {
    CustomerRow {
        id: Uuid::nil(),
        email: "a@b.co".into(),
        name: String::new(),
        status: status.into(),
        meta: Json(BTreeMap::new()),
        k8s_namespace: "ns".into(),
        k8s_name: "c".into(),
        k8s_uid: "u".into(),
        generation: 1,
        created_at: T0,
        updated_at: T0,
        deleted_at: None,
        plan_digest: None,
    }
}

/// A live key `ns/k` of the nil customer with `status`, scopes `*`, no expiry.
pub fn key_row(status: &str) -> ApiKeyRow {
    let row = ApiKeyRow {
        id: Uuid::nil(),
        customer_id: Uuid::nil(),
        key_hash: "0".repeat(64),
        key_prefix: "m3o_abcd".into(),
        scopes: vec!["*".into()],
        status: status.into(),
        description: String::new(),
        expires_at: None,
        k8s_namespace: "ns".into(),
        k8s_name: "k".into(),
        k8s_uid: "uk".into(),
        generation: 1,
        rotation_generation: 0,
        grace_until: None,
        blocked_message: String::new(),
        created_at: T0,
        updated_at: T0,
        revoked_at: None,
        plan_digest: None,
    };
    written(row)
}

/// `row` as the operator wrote it: its stored digest is that of its fields.
pub fn written(row: ApiKeyRow) -> ApiKeyRow {
    use crate::pipeline::row_plan::Digested;
    ApiKeyRow {
        plan_digest: Some(row.fields().digest()),
        ..row
    }
}

/// A live subscription `ns/s` of the nil customer on `plan` (7 requests a month, 3/s).
pub fn subscription_row(plan: &str) -> SubscriptionRow {
    SubscriptionRow {
        id: Uuid::nil(),
        customer_id: Uuid::nil(),
        plan: plan.into(),
        monthly_requests: 7,
        requests_per_second: 3,
        status: "active".into(),
        k8s_namespace: "ns".into(),
        k8s_name: "s".into(),
        k8s_uid: "u".into(),
        generation: 1,
        created_at: T0,
        updated_at: T0,
        cancelled_at: None,
        plan_digest: None,
    }
}

/// The conditions of a status whose `Ready` is `ok` with `reason`, at `generation`.
pub fn ready_conditions(ok: bool, reason: &'static str, generation: i64) -> Vec<Condition> {
    merge(
        &[],
        &[Cond::new(types::READY, ok, reason, "msg")],
        Some(generation),
    )
}

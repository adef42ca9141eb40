//! `<prefix>/apikeys/<sha256 hex>`: what a gateway reads to authenticate a request.
//! Derived from the key row and its customer at the time of reading, so a banned
//! customer, an expiry or the end of a grace period is never served as `active`.

use chrono::{DateTime, SecondsFormat, Utc};
use m3o_crds::{ApiKey, ApiKeyState, CustomerStatusState};
use serde::Serialize;

use super::plan::blocked_message;
use crate::platform::entry::{DesiredEntry, owner_ref};
use crate::store::api_keys::ApiKeyRow;
use crate::store::customers::CustomerRow;

/// The gateway's view of a key (contract).
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyConfig {
    pub key_id: String,
    pub customer_id: String,
    pub scopes: Vec<String>,
    pub status: String,
    /// RFC 3339; null when the key does not expire.
    pub expires_at: Option<String>,
    /// Why the key is blocked; present only when `status` is `blocked`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_message: Option<String>,
}

/// The key of a hash, relative to the prefix.
pub fn apikey_key(hash: &str) -> String {
    format!("apikeys/{hash}")
}

/// True for a 64-character lowercase hex string.
pub fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// True when a key's entry is gone for good at `now` and can only come back if its row
/// is written again: revoked, or past the end of its rotation's grace period.
pub fn is_retired(row: &ApiKeyRow, now: DateTime<Utc>) -> bool {
    row.revoked_at.is_some()
        || ApiKeyState::parse(&row.status) == Some(ApiKeyState::Revoked)
        || row.grace_until.is_some_and(|g| g <= now)
}

/// The entry of a key row, or `None` when the gateway must not know the key
/// (revoked, grace period over, customer gone).
pub fn entry(
    row: &ApiKeyRow,
    customer: Option<&CustomerRow>,
    now: DateTime<Utc>,
) -> Option<DesiredEntry> {
    let customer = customer.filter(|c| c.deleted_at.is_none())?;
    if is_retired(row, now) {
        return None;
    }
    // A rotated-out key stops at the end of its grace period even if it would live longer.
    let expires_at = match (row.expires_at, row.grace_until) {
        (Some(e), Some(g)) => Some(e.min(g)),
        (e, g) => e.or(g),
    };
    let recorded = ApiKeyState::parse(&row.status);
    let banned = CustomerStatusState::parse(&customer.status) == Some(CustomerStatusState::Banned);
    let state = if expires_at.is_some_and(|t| t <= now) {
        Some(ApiKeyState::Expired)
    } else if recorded == Some(ApiKeyState::Active) && banned {
        Some(ApiKeyState::Blocked)
    } else {
        recorded
    };
    // A status this version does not know is passed on as recorded.
    let status = state.map_or_else(|| row.status.clone(), |s| s.as_str().to_owned());
    let config = ApiKeyConfig {
        key_id: row.id.to_string(),
        customer_id: row.customer_id.to_string(),
        scopes: row.scopes.clone(),
        status,
        expires_at: expires_at.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        blocked_message: (state == Some(ApiKeyState::Blocked))
            .then(|| blocked_message(&row.blocked_message, &customer.status)),
    };
    Some(DesiredEntry {
        value: serde_json::to_value(config).unwrap_or_default(),
        owner: owner_ref::<ApiKey>(&row.k8s_namespace, &row.k8s_name, &row.k8s_uid),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::Duration;
    use sqlx::types::Json;
    use uuid::Uuid;

    use super::*;

    fn customer(status: &str) -> CustomerRow {
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
            created_at: Utc::now(),
            updated_at: Utc::now(),
            deleted_at: None,
        }
    }

    fn row(status: &str) -> ApiKeyRow {
        ApiKeyRow {
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
            created_at: Utc::now(),
            updated_at: Utc::now(),
            revoked_at: None,
        }
    }

    fn status(row: &ApiKeyRow, customer: &CustomerRow) -> Option<String> {
        entry(row, Some(customer), Utc::now())
            .map(|e| e.value["status"].as_str().unwrap_or_default().to_owned())
    }

    #[test]
    fn a_banned_customer_blocks_its_keys() {
        assert_eq!(
            status(&row("active"), &customer("active")).as_deref(),
            Some("active")
        );
        assert_eq!(
            status(&row("active"), &customer("banned")).as_deref(),
            Some("blocked")
        );
    }

    #[test]
    fn expiry_and_grace_are_enforced_by_the_clock() {
        let mut r = row("active");
        r.expires_at = Some(Utc::now() - Duration::seconds(1));
        assert_eq!(status(&r, &customer("active")).as_deref(), Some("expired"));
        let mut r = row("active");
        r.grace_until = Some(Utc::now() + Duration::hours(1));
        let e = entry(&r, Some(&customer("active")), Utc::now()).expect("entry");
        assert!(
            e.value["expiresAt"].is_string(),
            "grace end is the expiry the gateway sees"
        );
        r.grace_until = Some(Utc::now() - Duration::seconds(1));
        assert_eq!(
            entry(&r, Some(&customer("active")), Utc::now()),
            None,
            "gone after grace"
        );
    }

    #[test]
    fn revoked_keys_and_gone_customers_have_no_entry() {
        assert_eq!(
            entry(&row("revoked"), Some(&customer("active")), Utc::now()),
            None
        );
        assert_eq!(entry(&row("active"), None, Utc::now()), None);
        let mut deleted = customer("deleted");
        deleted.deleted_at = Some(Utc::now());
        assert_eq!(entry(&row("active"), Some(&deleted), Utc::now()), None);
    }

    #[test]
    fn value_has_the_contract_fields() {
        let e = entry(&row("active"), Some(&customer("active")), Utc::now()).expect("entry");
        let mut fields: Vec<_> = e
            .value
            .as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect();
        fields.sort();
        assert_eq!(
            fields,
            ["customerId", "expiresAt", "keyId", "scopes", "status"]
        );
        assert!(is_hash(&"a".repeat(64)) && !is_hash("A") && !is_hash(&"g".repeat(64)));
    }
}

//! The platform config values the gateway reads (a contract: ARCHITECTURE.md),
//! parsed into compact typed entries. Pure: bytes in, entries out.

use chrono::DateTime;
use serde::Deserialize;

/// Directories under the prefix.
pub const APIKEYS: &str = "apikeys/";
pub const CUSTOMERS: &str = "customers/";
pub const QUOTAS: &str = "quotas/";
/// Where each replica reports its applied revision (written by gateways, not the operator).
pub const GATEWAYS: &str = "gateways/";

/// What a key under the prefix is, relative to the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// `apikeys/<sha256 hex>`.
    ApiKey([u8; 32]),
    Customer(String),
    Quota(String),
    /// `gateways/<replica>`: other replicas' reports.
    Gateway,
    /// Nothing the gateway reads.
    Other,
}

/// Classifies a key relative to the prefix.
pub fn slot(relative: &str) -> Slot {
    if let Some(hash) = relative.strip_prefix(APIKEYS) {
        return parse_hash(hash).map_or(Slot::Other, Slot::ApiKey);
    }
    if let Some(id) = relative.strip_prefix(CUSTOMERS).filter(|s| !s.is_empty()) {
        return Slot::Customer(id.to_owned());
    }
    if let Some(id) = relative.strip_prefix(QUOTAS).filter(|s| !s.is_empty()) {
        return Slot::Quota(id.to_owned());
    }
    if relative.starts_with(GATEWAYS) {
        return Slot::Gateway;
    }
    Slot::Other
}

/// A lowercase 64-character hex SHA-256, as the operator writes it.
pub fn parse_hash(hex_str: &str) -> Option<[u8; 32]> {
    if hex_str.len() != 64 || hex_str.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_str, &mut out).ok()?;
    Some(out)
}

/// The state of a key as published by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Blocked,
    Expired,
    /// Anything else (a newer operator's state): never accepted.
    Other,
}

/// `apikeys/<hash>`: a key as the gateway keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub key_id: Box<str>,
    pub customer_id: Box<str>,
    pub scopes: Box<[Box<str>]>,
    pub status: KeyStatus,
    /// Unix seconds; the gateway enforces it itself.
    pub expires_at: Option<i64>,
    pub blocked_message: Option<Box<str>>,
}

/// `customers/<id>`: only what a decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerEntry {
    pub banned: bool,
}

/// `quotas/<customerId>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub monthly_requests: u64,
    pub requests_per_second: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyValue {
    key_id: String,
    customer_id: String,
    scopes: Vec<String>,
    status: String,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    blocked_message: Option<String>,
}

#[derive(Deserialize)]
struct CustomerValue {
    status: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QuotaValue {
    monthly_requests: i64,
    requests_per_second: i64,
}

/// Parses a key's value; `None` when it is malformed (the key is then unknown: a
/// value the gateway cannot read must not let anything through).
pub fn parse_key(bytes: &[u8]) -> Option<KeyEntry> {
    let v: KeyValue = serde_json::from_slice(bytes).ok()?;
    let expires_at = match v.expires_at {
        Some(t) => Some(DateTime::parse_from_rfc3339(&t).ok()?.timestamp()),
        None => None,
    };
    let status = match v.status.as_str() {
        "active" => KeyStatus::Active,
        "blocked" => KeyStatus::Blocked,
        "expired" => KeyStatus::Expired,
        _ => KeyStatus::Other,
    };
    Some(KeyEntry {
        key_id: v.key_id.into(),
        customer_id: v.customer_id.into(),
        scopes: v.scopes.into_iter().map(Into::into).collect(),
        status,
        expires_at,
        blocked_message: v.blocked_message.filter(|m| !m.is_empty()).map(Into::into),
    })
}

pub fn parse_customer(bytes: &[u8]) -> Option<CustomerEntry> {
    let v: CustomerValue = serde_json::from_slice(bytes).ok()?;
    Some(CustomerEntry {
        banned: v.status == "banned",
    })
}

pub fn parse_quota(bytes: &[u8]) -> Option<Quota> {
    let v: QuotaValue = serde_json::from_slice(bytes).ok()?;
    Some(Quota {
        monthly_requests: v.monthly_requests.max(0) as u64,
        requests_per_second: v.requests_per_second.max(0) as u64,
    })
}

/// `gateways/<replica>`: `{"appliedRevision": N}` (contract).
#[derive(serde::Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayReport {
    pub applied_revision: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_classified() {
        let hash = "ab".repeat(32);
        assert!(matches!(slot(&format!("apikeys/{hash}")), Slot::ApiKey(_)));
        assert_eq!(slot(&format!("apikeys/{}", "AB".repeat(32))), Slot::Other);
        assert_eq!(slot("apikeys/short"), Slot::Other);
        assert_eq!(slot("customers/x"), Slot::Customer("x".into()));
        assert_eq!(slot("customers/"), Slot::Other);
        assert_eq!(slot("quotas/x"), Slot::Quota("x".into()));
        assert_eq!(slot("gateways/r1"), Slot::Gateway);
        assert_eq!(slot("elsewhere"), Slot::Other);
    }

    #[test]
    fn key_values_parse_as_the_operator_writes_them() {
        let v = br#"{"keyId":"k","customerId":"c","scopes":["*"],"status":"blocked","expiresAt":"2030-01-01T00:00:00Z","blockedMessage":"fraud"}"#;
        let e = parse_key(v).expect("parses");
        assert_eq!(e.status, KeyStatus::Blocked);
        assert_eq!(e.expires_at, Some(1_893_456_000));
        assert_eq!(e.blocked_message.as_deref(), Some("fraud"));
        let v = br#"{"keyId":"k","customerId":"c","scopes":[],"status":"active","expiresAt":null}"#;
        assert_eq!(parse_key(v).expect("parses").expires_at, None);
        let bad_time =
            br#"{"keyId":"k","customerId":"c","scopes":[],"status":"active","expiresAt":"soon"}"#;
        assert_eq!(parse_key(bad_time), None);
        assert_eq!(parse_key(b"not json"), None);
    }

    #[test]
    fn customers_and_quotas_parse() {
        let c = br#"{"id":"c","email":"a@b.c","name":"","status":"banned","plan":"pro"}"#;
        assert_eq!(parse_customer(c), Some(CustomerEntry { banned: true }));
        let q = br#"{"plan":"pro","monthlyRequests":10,"requestsPerSecond":2}"#;
        assert_eq!(
            parse_quota(q),
            Some(Quota {
                monthly_requests: 10,
                requests_per_second: 2
            })
        );
    }
}

//! The platform config values the gateway reads, parsed into compact typed entries.
//! The layout and the values are the contract crate's ([`m3o_platform_contract`]);
//! this keeps only what a check needs, in little memory. Pure: bytes in, entries out.

use chrono::DateTime;
use m3o_platform_contract::{ApiKeyValue, CustomerValue, QuotaValue};
pub use m3o_platform_contract::{GatewayReport, KeyStatus};

/// What a key under the prefix is, relative to the prefix
/// ([`m3o_platform_contract::classify`], with the hash decoded for the index).
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
    use m3o_platform_contract::Slot as S;
    match m3o_platform_contract::classify(relative) {
        S::ApiKey(hash) => parse_hash(hash).map_or(Slot::Other, Slot::ApiKey),
        S::Customer(id) => Slot::Customer(id.to_owned()),
        S::Quota(id) => Slot::Quota(id.to_owned()),
        S::GatewayReport(_) => Slot::Gateway,
        S::Other => Slot::Other,
    }
}

/// A lowercase 64-character hex SHA-256, as the operator writes it.
pub fn parse_hash(hex_str: &str) -> Option<[u8; 32]> {
    if !m3o_platform_contract::keys::is_key_hash(hex_str) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_str, &mut out).ok()?;
    Some(out)
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

/// Parses a key's value; `None` when it is malformed (the key is then unknown: a
/// value the gateway cannot read must not let anything through).
pub fn parse_key(bytes: &[u8]) -> Option<KeyEntry> {
    let v: ApiKeyValue = serde_json::from_slice(bytes).ok()?;
    let expires_at = match v.expires_at {
        Some(t) => Some(DateTime::parse_from_rfc3339(&t).ok()?.timestamp()),
        None => None,
    };
    Some(KeyEntry {
        key_id: v.key_id.into(),
        customer_id: v.customer_id.into(),
        scopes: v.scopes.into_iter().map(Into::into).collect(),
        status: KeyStatus::parse(&v.status),
        expires_at,
        blocked_message: v.blocked_message.filter(|m| !m.is_empty()).map(Into::into),
    })
}

pub fn parse_customer(bytes: &[u8]) -> Option<CustomerEntry> {
    let v: CustomerValue = serde_json::from_slice(bytes).ok()?;
    Some(CustomerEntry {
        banned: v.is_banned(),
    })
}

pub fn parse_quota(bytes: &[u8]) -> Option<Quota> {
    let v: QuotaValue = serde_json::from_slice(bytes).ok()?;
    Some(Quota {
        monthly_requests: v.monthly_requests.max(0) as u64,
        requests_per_second: v.requests_per_second.max(0) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_classified_by_the_contract() {
        use m3o_platform_contract::{apikey_key, customer_key, gateway_key, quota_key};
        let hash = "ab".repeat(32);
        assert!(matches!(slot(&apikey_key(&hash)), Slot::ApiKey(_)));
        assert_eq!(slot(&apikey_key(&"AB".repeat(32))), Slot::Other);
        assert_eq!(slot(&customer_key("x")), Slot::Customer("x".into()));
        assert_eq!(slot(&quota_key("x")), Slot::Quota("x".into()));
        assert_eq!(slot(&gateway_key("r1")), Slot::Gateway);
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

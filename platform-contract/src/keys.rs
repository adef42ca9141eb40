//! The etcd key layout under the operator's prefix: the one file that spells it.
//!
//! Keys here are relative to the prefix (`customers/<id>`); callers join them to the
//! prefix they were configured with. Ids are written in one canonical form (a UUID in
//! lowercase, hyphenated; a hash in lowercase hex). A hash in any other form is a key
//! nothing owns; an id in another spelling is classified by its directory, and
//! [`Slot::is_canonical`] tells the operator to prune it.

use std::fmt::Display;

const CUSTOMERS: &str = "customers/";
const QUOTAS: &str = "quotas/";
const APIKEYS: &str = "apikeys/";
const GATEWAYS: &str = "gateways/";
const WRITER_EPOCH: &str = ".writer-epoch";
const WRITER_DATABASE: &str = ".writer-epoch.database";

/// `customers/<customerId>`: a customer's [`crate::CustomerValue`].
pub fn customer_key(id: impl Display) -> String {
    format!("{CUSTOMERS}{id}")
}

/// `quotas/<customerId>`: the [`crate::QuotaValue`] of a customer's subscription in force.
pub fn quota_key(customer_id: impl Display) -> String {
    format!("{QUOTAS}{customer_id}")
}

/// `apikeys/<sha256 hex of the key>`: a key's [`crate::ApiKeyValue`].
pub fn apikey_key(hash: &str) -> String {
    format!("{APIKEYS}{hash}")
}

/// `gateways/<replica>`: a gateway replica's [`crate::GatewayReport`], under its lease.
pub fn gateway_key(replica: &str) -> String {
    format!("{GATEWAYS}{replica}")
}

/// The directory of gateway reports (list or watch it with a prefix range).
pub const GATEWAY_REPORTS: &str = GATEWAYS;

/// The key of the writer fence's epoch: beside `prefix` (not under it, so gateways and
/// the drift watcher never see it), one per shard fence (`name`, empty when unsharded).
pub fn writer_epoch_key(prefix: &str, name: &str) -> String {
    match name {
        "" => format!("{prefix}{WRITER_EPOCH}"),
        name => format!("{prefix}{WRITER_EPOCH}.{name}"),
    }
}

/// The key naming the database whose operators write `prefix` (its id, a UUID in
/// canonical text): beside the fence keys, under the `<prefix>.writer-epoch` range an
/// operator's etcd user already reads and writes ("database" is never a shard fence's
/// name, which is hex). An operator writes the prefix only while this key holds its
/// database's id, or is absent (then it records it with its term).
pub fn writer_database_key(prefix: &str) -> String {
    format!("{prefix}{WRITER_DATABASE}")
}

/// What a key under the prefix is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot<'a> {
    /// `customers/<id>`.
    Customer(&'a str),
    /// `quotas/<customerId>`.
    Quota(&'a str),
    /// `apikeys/<hash>`, 64 lowercase hex digits.
    ApiKey(&'a str),
    /// `gateways/<replica>`: written by gateways, never by the operator.
    GatewayReport(&'a str),
    /// Anything else: no record owns it (the operator prunes it, gateways ignore it).
    Other,
}

impl Slot<'_> {
    /// True unless the key names a record in a form the operator never writes (an id
    /// that is not a canonical UUID): such a key is owned by nothing and pruned.
    pub fn is_canonical(&self) -> bool {
        match self {
            Self::Customer(id) | Self::Quota(id) => is_canonical_uuid(id),
            Self::ApiKey(_) | Self::GatewayReport(_) | Self::Other => true,
        }
    }
}

/// Classifies a key relative to the prefix.
pub fn classify(relative: &str) -> Slot<'_> {
    let id = |s: &str| !s.is_empty() && !s.contains('/');
    if let Some(s) = relative.strip_prefix(CUSTOMERS) {
        return if id(s) {
            Slot::Customer(s)
        } else {
            Slot::Other
        };
    }
    if let Some(s) = relative.strip_prefix(QUOTAS) {
        return if id(s) { Slot::Quota(s) } else { Slot::Other };
    }
    if let Some(hash) = relative.strip_prefix(APIKEYS) {
        return if is_key_hash(hash) {
            Slot::ApiKey(hash)
        } else {
            Slot::Other
        };
    }
    // Anything under `gateways/` is a gateway's: never pruned by the operator.
    match relative.strip_prefix(GATEWAYS) {
        Some(replica) => Slot::GatewayReport(replica),
        None => Slot::Other,
    }
}

/// True for a SHA-256 in lowercase hex, as keys are named.
pub fn is_key_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// True for a UUID in its canonical text form (lowercase, hyphenated), as ids are written.
pub fn is_canonical_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => matches!(b, b'0'..=b'9' | b'a'..=b'f'),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0b9e9d1c-7d0a-4c3e-9f4e-1d2c3b4a5f60";

    #[test]
    fn keys_round_trip_through_classify() {
        let hash = "ab".repeat(32);
        assert_eq!(classify(&customer_key(ID)), Slot::Customer(ID));
        assert_eq!(classify(&quota_key(ID)), Slot::Quota(ID));
        assert_eq!(classify(&apikey_key(&hash)), Slot::ApiKey(&hash));
        assert_eq!(classify(&gateway_key("r1")), Slot::GatewayReport("r1"));
    }

    #[test]
    fn other_spellings_are_owned_by_nothing() {
        let upper = ID.to_uppercase();
        let simple = ID.replace('-', "");
        for key in [
            format!("customers/{upper}"),
            format!("quotas/{simple}"),
            "customers/x".into(),
        ] {
            assert!(!classify(&key).is_canonical(), "{key}");
        }
        assert!(classify(&customer_key(ID)).is_canonical());
        for key in [
            "customers/".to_owned(),
            "quotas/a/b".to_owned(),
            format!("apikeys/{}", "AB".repeat(32)),
            "apikeys/short".to_owned(),
            "stray".to_owned(),
            "other/x".to_owned(),
        ] {
            assert_eq!(classify(&key), Slot::Other, "{key}");
        }
        assert_eq!(
            classify("gateways/"),
            Slot::GatewayReport(""),
            "never pruned"
        );
    }

    #[test]
    fn the_fence_key_is_beside_the_prefix() {
        assert_eq!(writer_epoch_key("/m3o", ""), "/m3o.writer-epoch");
        assert_eq!(writer_epoch_key("/m3o", "s1"), "/m3o.writer-epoch.s1");
        assert_eq!(writer_database_key("/m3o"), "/m3o.writer-epoch.database");
        assert!(writer_database_key("/m3o").starts_with(&writer_epoch_key("/m3o", "")));
    }
}

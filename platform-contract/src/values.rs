//! The JSON values under the prefix, as the operator writes them and gateways read them.
//! Field names are the contract (README "The resources", docs/gateway.md); a reader ignores fields it does
//! not know, so the operator may add some without breaking older gateways.

use serde::{Deserialize, Serialize};

/// Fields a gateway does not decide with are read leniently: a hand-edited `null` or
/// number there must not make the whole value unreadable (an unreadable quota would
/// drop the customer's limits, an unreadable customer its ban).
mod lenient {
    use std::fmt;

    use serde::Deserializer;
    use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};

    /// A string as it is; any other JSON value as the empty string.
    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        struct AnyAsString;
        impl<'de> Visitor<'de> for AnyAsString {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
                Ok(v.to_owned())
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
                Ok(v)
            }
            fn visit_unit<E: de::Error>(self) -> Result<String, E> {
                Ok(String::new())
            }
            fn visit_none<E: de::Error>(self) -> Result<String, E> {
                Ok(String::new())
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<String, E> {
                Ok(String::new())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<String, E> {
                Ok(String::new())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<String, E> {
                Ok(String::new())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<String, E> {
                Ok(String::new())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(String::new())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(String::new())
            }
        }
        d.deserialize_any(AnyAsString)
    }
}

/// `customers/<id>`: what the gateway knows of a customer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CustomerValue {
    #[serde(default, deserialize_with = "lenient::string")]
    pub id: String,
    #[serde(default, deserialize_with = "lenient::string")]
    pub email: String,
    #[serde(default, deserialize_with = "lenient::string")]
    pub name: String,
    /// The M3O customer status (`unverified|verified|active|banned`).
    pub status: String,
    /// The plan of the customer's subscription in force; empty while it has none.
    #[serde(default, deserialize_with = "lenient::string")]
    pub plan: String,
}

/// The customer status that refuses every key of the customer.
pub const BANNED: &str = "banned";

impl CustomerValue {
    pub fn is_banned(&self) -> bool {
        self.status == BANNED
    }
}

/// `quotas/<customerId>`: what the gateway enforces for a customer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct QuotaValue {
    #[serde(default, deserialize_with = "lenient::string")]
    pub plan: String,
    pub monthly_requests: i64,
    pub requests_per_second: i64,
}

/// `apikeys/<sha256 hex>`: what a gateway reads to authenticate a request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyValue {
    pub key_id: String,
    pub customer_id: String,
    pub scopes: Vec<String>,
    /// A [`KeyStatus`]; never `active` for a blocked, expired or banned customer's key.
    pub status: String,
    /// RFC 3339; null when the key does not expire (a rotated-out key: its grace end).
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Why the key is blocked; present only when `status` is `blocked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_message: Option<String>,
}

/// The `status` of an [`ApiKeyValue`]. A revoked key has no value at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Blocked,
    Expired,
    /// Anything else (a newer operator's state): never accepted.
    Other,
}

impl KeyStatus {
    pub fn parse(s: &str) -> Self {
        match s {
            "active" => Self::Active,
            "blocked" => Self::Blocked,
            "expired" => Self::Expired,
            _ => Self::Other,
        }
    }

    /// The published string; `None` for [`KeyStatus::Other`], which only a reader meets.
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            Self::Active => Some("active"),
            Self::Blocked => Some("blocked"),
            Self::Expired => Some("expired"),
            Self::Other => None,
        }
    }
}

/// `gateways/<replica>`: the etcd revision a replica has applied, under its lease, and
/// how long it may serve a snapshot etcd has not confirmed (docs/gateway.md).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewayReport {
    pub applied_revision: i64,
    /// The replica's `--max-staleness`, rounded up to whole seconds. Absent from a
    /// gateway older than the flag, which has no bound: read as `--stale-mode=serve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_staleness_seconds: Option<u64>,
    /// `"serve"` when the replica keeps serving past its bound (which voids
    /// `GatewaySynced`); absent under the default `fail`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_mode: Option<StaleMode>,
    /// `true` in the last report of a replica shutting down gracefully: it has stopped
    /// answering checks, so once its report vanishes the operator forgets it at once,
    /// whatever its bound. Absent otherwise (and from older gateways; older readers
    /// ignore it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
}

/// What a replica does once etcd has not confirmed its index for `--max-staleness`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StaleMode {
    /// Refuse checks (503) and fail `/readyz`.
    Fail,
    /// Keep answering from the snapshot.
    Serve,
    /// A mode this reader does not know: not trusted to stop serving.
    #[serde(other)]
    Unknown,
}

impl GatewayReport {
    /// How long after its report vanished the replica may still serve a snapshot;
    /// `None` when it may serve one for ever (serve mode, an unknown mode, no bound).
    pub fn staleness_bound(&self) -> Option<u64> {
        match self.stale_mode {
            None | Some(StaleMode::Fail) => self.max_staleness_seconds,
            Some(StaleMode::Serve | StaleMode::Unknown) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_have_the_contract_field_names() {
        let key = ApiKeyValue {
            key_id: "k".into(),
            customer_id: "c".into(),
            scopes: vec!["*".into()],
            status: "active".into(),
            expires_at: None,
            blocked_message: None,
        };
        assert_eq!(
            serde_json::to_value(&key).expect("json"),
            serde_json::json!({"keyId": "k", "customerId": "c", "scopes": ["*"], "status": "active", "expiresAt": null})
        );
        let quota = QuotaValue {
            plan: "pro".into(),
            monthly_requests: 7,
            requests_per_second: 3,
        };
        assert_eq!(
            serde_json::to_value(&quota).expect("json"),
            serde_json::json!({"plan": "pro", "monthlyRequests": 7, "requestsPerSecond": 3})
        );
        let report: GatewayReport =
            serde_json::from_str(r#"{"appliedRevision":42,"more":1}"#).expect("json");
        assert_eq!(report.applied_revision, 42);
        assert_eq!(report.staleness_bound(), None, "no bound: an older gateway");
        let report = GatewayReport {
            applied_revision: 7,
            max_staleness_seconds: Some(10),
            stale_mode: None,
            stopped: false,
        };
        assert_eq!(
            serde_json::to_value(report).expect("json"),
            serde_json::json!({"appliedRevision": 7, "maxStalenessSeconds": 10})
        );
        assert_eq!(report.staleness_bound(), Some(10));
        let serve: GatewayReport = serde_json::from_str(
            r#"{"appliedRevision":7,"maxStalenessSeconds":10,"staleMode":"serve"}"#,
        )
        .expect("json");
        assert_eq!(serve.stale_mode, Some(StaleMode::Serve));
        assert_eq!(serve.staleness_bound(), None);
        let odd: GatewayReport = serde_json::from_str(
            r#"{"appliedRevision":7,"maxStalenessSeconds":10,"staleMode":"later"}"#,
        )
        .expect("an unknown mode still parses");
        assert_eq!(odd.staleness_bound(), None);
        let stopped = GatewayReport {
            stopped: true,
            ..serve
        };
        assert_eq!(
            serde_json::to_value(stopped).expect("json"),
            serde_json::json!({"appliedRevision": 7, "maxStalenessSeconds": 10, "staleMode": "serve", "stopped": true})
        );
        let read: GatewayReport =
            serde_json::from_str(r#"{"appliedRevision":7,"stopped":true}"#).expect("json");
        assert!(read.stopped);
    }

    #[test]
    fn fields_a_gateway_does_not_read_never_make_a_value_unreadable() {
        let quota: QuotaValue =
            serde_json::from_str(r#"{"plan":null,"monthlyRequests":0,"requestsPerSecond":0}"#)
                .expect("a quota with a null plan is still a quota of 0");
        assert_eq!((quota.plan.as_str(), quota.monthly_requests), ("", 0));
        let customer: CustomerValue =
            serde_json::from_str(r#"{"status":"banned","name":null,"email":7,"plan":{"a":[1]}}"#)
                .expect("a banned customer with odd fields is still banned");
        assert!(customer.is_banned());
        assert!(
            serde_json::from_str::<QuotaValue>(r#"{"monthlyRequests":"x","requestsPerSecond":1}"#)
                .is_err()
        );
    }

    #[test]
    fn key_statuses_round_trip() {
        for s in [KeyStatus::Active, KeyStatus::Blocked, KeyStatus::Expired] {
            assert_eq!(KeyStatus::parse(s.as_str().expect("published")), s);
        }
        assert_eq!(KeyStatus::parse("revoked"), KeyStatus::Other);
    }
}

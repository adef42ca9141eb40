//! The comparisons behind `inspect` and `audit`, free of I/O: an etcd entry against
//! the value Postgres implies, a Secret's key against the recorded hash, which events
//! concern a resource.

use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use m3o_controllers::apikey::secret::{self, DATA_API_KEY, DATA_KEY_ID};
use m3o_controllers::platform::desired::DesiredEntry;
pub use m3o_controllers::platform::entry::{EntryVerdict, entry_verdict};
use m3o_controllers::store::api_keys::ApiKeyRow;
use m3o_events::customers::Event;
use serde::Serialize;

/// One etcd key compared: what is there, what should be, and whose it is.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct EntryCheck {
    pub key: String,
    pub verdict: EntryVerdict,
    /// The resource the desired value belongs to (`Kind namespace/name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub desired: Option<serde_json::Value>,
    /// The stored value: JSON when it parses, else the raw text.
    pub actual: Option<serde_json::Value>,
}

/// Compares absolute `key`'s raw value with its desired entry.
pub fn check_entry(
    key: String,
    desired: Option<&DesiredEntry>,
    actual: Option<&[u8]>,
) -> EntryCheck {
    EntryCheck {
        verdict: entry_verdict(desired.map(|d| &d.value), actual),
        owner: desired.map(|d| describe(&d.owner)),
        desired: desired.map(|d| d.value.clone()),
        actual: actual.map(|raw| {
            serde_json::from_slice(raw)
                .unwrap_or_else(|_| String::from_utf8_lossy(raw).into_owned().into())
        }),
        key,
    }
}

/// `Kind namespace/name` of a reference.
pub fn describe(owner: &ObjectReference) -> String {
    format!(
        "{} {}/{}",
        owner.kind.as_deref().unwrap_or("?"),
        owner.namespace.as_deref().unwrap_or(""),
        owner.name.as_deref().unwrap_or("?")
    )
}

/// How an ApiKey's Secret compares with the recorded key hashes.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SecretVerdict {
    /// The key hashes to the recorded hash of a live key row named by `keyId`.
    Matches,
    /// The key hashes to no recorded hash, or to another key than `keyId` names.
    Differs,
    /// The key is a revoked one.
    Revoked,
    /// No Secret.
    Missing,
    /// A Secret without an `apiKey` entry.
    NoKey,
}

impl SecretVerdict {
    pub fn is_drift(self) -> bool {
        !matches!(self, Self::Matches)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Matches => "matches",
            Self::Differs => "differs",
            Self::Revoked => "revoked",
            Self::Missing => "missing",
            Self::NoKey => "no-key",
        }
    }
}

/// The Secret check; never holds the key, only what identifies it.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretCheck {
    pub name: String,
    pub verdict: SecretVerdict,
    /// `keyId` as the Secret states it.
    pub key_id: Option<String>,
    /// The recorded key whose hash the Secret's key has (its id and display prefix).
    pub recorded_key_id: Option<String>,
    pub recorded_prefix: Option<String>,
}

/// Hashes the Secret's key and looks the hash up among the resource's key rows.
pub fn check_secret(name: &str, secret: Option<&Secret>, rows: &[ApiKeyRow]) -> SecretCheck {
    let data = secret.map(|s| s.data.clone().unwrap_or_default());
    let key_id = data
        .as_ref()
        .and_then(|d| d.get(DATA_KEY_ID))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let hash = data
        .as_ref()
        .and_then(|d| d.get(DATA_API_KEY))
        .map(|b| secret::hash(&b.0));
    let recorded = hash
        .as_ref()
        .and_then(|h| rows.iter().find(|r| &r.key_hash == h));
    let verdict = match (&data, &hash, recorded) {
        (None, _, _) => SecretVerdict::Missing,
        (Some(_), None, _) => SecretVerdict::NoKey,
        (Some(_), Some(_), None) => SecretVerdict::Differs,
        (Some(_), Some(_), Some(row)) if row.revoked_at.is_some() => SecretVerdict::Revoked,
        (Some(_), Some(_), Some(row)) if key_id.as_deref() != Some(&row.id.to_string()) => {
            SecretVerdict::Differs
        }
        (Some(_), Some(_), Some(_)) => SecretVerdict::Matches,
    };
    SecretCheck {
        name: name.to_owned(),
        verdict,
        key_id,
        recorded_key_id: recorded.map(|r| r.id.to_string()),
        recorded_prefix: recorded.map(|r| r.key_prefix.clone()),
    }
}

/// Whose events to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// Every event about the customer (its keys' and subscription's too).
    Customer { id: String },
    /// The customer's subscription events.
    Subscription { customer_id: String },
    /// Events about any of these keys.
    ApiKey { key_ids: Vec<String> },
}

impl Subject {
    /// True when `event` is about this subject.
    pub fn concerns(&self, event: &Event) -> bool {
        let customer_id = event.customer.as_ref().map(|c| c.id.as_str());
        match self {
            Self::Customer { id } => customer_id == Some(id.as_str()),
            Self::Subscription { customer_id: id } => {
                customer_id == Some(id.as_str())
                    && (event.subscription_changed.is_some()
                        || event.subscription_cancelled.is_some())
            }
            Self::ApiKey { key_ids } => {
                key_ids_of(event).any(|k| key_ids.iter().any(|mine| mine == k))
            }
        }
    }
}

/// The key ids an event names.
fn key_ids_of(event: &Event) -> impl Iterator<Item = &str> {
    [
        event.generate_key.as_ref().map(|k| k.id.as_str()),
        event.delete_key.as_ref().map(|k| k.id.as_str()),
        event.block_key.as_ref().map(|k| k.id.as_str()),
        event.unblock_key.as_ref().map(|k| k.id.as_str()),
        event.key_expired.as_ref().map(|k| k.id.as_str()),
        event.key_rotated.as_ref().map(|k| k.id.as_str()),
        event.key_rotated.as_ref().map(|k| k.previous_id.as_str()),
    ]
    .into_iter()
    .flatten()
    .filter(|id| !id.is_empty())
}

/// What an event says beyond its type: the customer's status, key or tier.
pub fn event_detail(event: &Event) -> String {
    let mut parts = Vec::new();
    if let Some(c) = &event.customer {
        parts.push(format!("customer={} status={}", c.id, c.status));
    }
    if let Some(key) = key_ids_of(event).next() {
        parts.push(format!("key={key}"));
    }
    let tier = (event.subscription_changed.as_ref().map(|s| &s.tier))
        .or(event.subscription_cancelled.as_ref().map(|s| &s.tier));
    if let Some(tier) = tier {
        parts.push(format!("tier={tier}"));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests;

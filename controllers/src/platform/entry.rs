//! The unit of etcd config: a desired entry and the resource it belongs to. A leaf
//! module: each kind's `config.rs` builds entries, `desired` gathers them, the client
//! writes them; none of that is imported here.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;

/// A desired key: its value and the resource it belongs to (for Events).
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredEntry {
    pub value: serde_json::Value,
    pub owner: ObjectReference,
}

impl DesiredEntry {
    /// The bytes etcd holds for this entry.
    pub fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.value).unwrap_or_default()
    }
}

/// Values are compared as JSON, so formatting differences are not drift.
pub fn same_value(bytes: &[u8], value: &serde_json::Value) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes).is_ok_and(|v| &v == value)
}

/// How an etcd entry compares with what Postgres says it should be: the drift
/// watcher repairs what [`EntryVerdict::is_drift`], `inspect` and `audit` report it.
#[derive(serde::Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum EntryVerdict {
    /// Present and equal to the desired value.
    Matches,
    /// Present with another value (a hand edit not yet restored).
    Differs,
    /// Desired but absent.
    Missing,
    /// Present although no record wants it.
    Unowned,
    /// Neither desired nor present (e.g. a revoked key): as it should be.
    Absent,
}

impl EntryVerdict {
    /// True when the entry is not as Postgres says.
    pub fn is_drift(self) -> bool {
        matches!(self, Self::Differs | Self::Missing | Self::Unowned)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Matches => "matches",
            Self::Differs => "differs",
            Self::Missing => "missing",
            Self::Unowned => "unowned",
            Self::Absent => "absent",
        }
    }
}

/// Compares an entry's raw value with its desired value (both optional).
pub fn entry_verdict(desired: Option<&serde_json::Value>, actual: Option<&[u8]>) -> EntryVerdict {
    match (desired, actual) {
        (Some(want), Some(have)) if same_value(have, want) => EntryVerdict::Matches,
        (Some(_), Some(_)) => EntryVerdict::Differs,
        (Some(_), None) => EntryVerdict::Missing,
        (None, Some(_)) => EntryVerdict::Unowned,
        (None, None) => EntryVerdict::Absent,
    }
}

/// A reference to a resource of kind `K`, for Events about it.
pub fn owner_ref<K: Resource<DynamicType = ()>>(
    namespace: &str,
    name: &str,
    uid: &str,
) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        namespace: Some(namespace.to_owned()),
        name: Some(name.to_owned()),
        uid: (!uid.is_empty()).then(|| uid.to_owned()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_compare_as_json() {
        let v = serde_json::json!({"id": "1", "email": "a@b.c"});
        assert!(same_value(br#"{ "email":"a@b.c","id":"1" }"#, &v));
        assert!(!same_value(br#"{"id":"1","email":"x@b.c"}"#, &v));
        assert!(!same_value(b"not json", &v));
    }
}

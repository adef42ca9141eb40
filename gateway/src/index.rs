//! The in-memory index of the platform config: built from a list, kept current by
//! watch events. Pure data: the etcd side is in [`crate::follow`].

use std::collections::HashMap;

use crate::entries::{self, CustomerEntry, KeyEntry, Quota, Slot};

/// Everything a check reads, keyed the way checks look it up.
#[derive(Debug, Default, Clone)]
pub struct Index {
    keys: HashMap<[u8; 32], KeyEntry>,
    customers: HashMap<Box<str>, CustomerEntry>,
    quotas: HashMap<Box<str>, Quota>,
}

/// What applying one change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// An entry was stored or removed.
    Changed,
    /// A key the gateway does not read (including other replicas' reports).
    Ignored,
    /// A value the gateway cannot read: the entry was removed (fail closed).
    Invalid,
}

impl Index {
    /// Stores (`Some`) or removes (`None`) the value of `relative` (a key relative to the prefix).
    pub fn apply(&mut self, relative: &str, value: Option<&[u8]>) -> Applied {
        fn put<K: Eq + std::hash::Hash, V>(
            map: &mut HashMap<K, V>,
            k: K,
            v: Option<Option<V>>,
        ) -> Applied {
            match v {
                Some(Some(v)) => {
                    map.insert(k, v);
                    Applied::Changed
                }
                Some(None) => {
                    map.remove(&k);
                    Applied::Invalid
                }
                None => {
                    map.remove(&k);
                    Applied::Changed
                }
            }
        }
        match entries::slot(relative) {
            Slot::ApiKey(hash) => put(&mut self.keys, hash, value.map(entries::parse_key)),
            Slot::Customer(id) => put(
                &mut self.customers,
                id.into(),
                value.map(entries::parse_customer),
            ),
            Slot::Quota(id) => put(&mut self.quotas, id.into(), value.map(entries::parse_quota)),
            Slot::Gateway | Slot::Other => Applied::Ignored,
        }
    }

    pub fn key(&self, hash: &[u8; 32]) -> Option<&KeyEntry> {
        self.keys.get(hash)
    }

    pub fn customer(&self, id: &str) -> Option<&CustomerEntry> {
        self.customers.get(id)
    }

    pub fn quota(&self, customer_id: &str) -> Option<Quota> {
        self.quotas.get(customer_id).copied()
    }

    /// Entry counts: keys, customers, quotas.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.keys.len(), self.customers.len(), self.quotas.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn puts_deletes_and_invalid_values() {
        let mut index = Index::default();
        let hash = "0f".repeat(32);
        let key = m3o_platform_contract::apikey_key(&hash);
        let value =
            br#"{"keyId":"k","customerId":"c","scopes":["*"],"status":"active","expiresAt":null}"#;
        assert_eq!(index.apply(&key, Some(value)), Applied::Changed);
        let parsed = entries::parse_hash(&hash).expect("hash");
        assert!(index.key(&parsed).is_some());
        assert_eq!(index.apply(&key, Some(b"garbage")), Applied::Invalid);
        assert!(
            index.key(&parsed).is_none(),
            "an unreadable value fails closed"
        );
        index.apply(&key, Some(value));
        assert_eq!(index.apply(&key, None), Applied::Changed);
        assert!(index.key(&parsed).is_none());
        assert_eq!(
            index.apply(&m3o_platform_contract::gateway_key("r"), Some(b"{}")),
            Applied::Ignored
        );
        assert_eq!(index.sizes(), (0, 0, 0));
    }
}

//! The in-memory index of the platform config: built from a list, kept current by
//! watch events. Pure data: the etcd side is in [`crate::follow`].
//!
//! A change is parsed first ([`Change::parse`], no lock needed) and stored after
//! ([`Index::store`], under the follower's write lock), so a check never waits on JSON.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher};

use crate::entries::{self, CustomerEntry, KeyEntry, Quota, Slot};

/// Everything a check reads, keyed the way checks look it up.
#[derive(Debug, Default, Clone)]
pub struct Index {
    keys: HashMap<[u8; 32], KeyEntry>,
    customers: HashMap<Box<str>, CustomerEntry>,
    quotas: HashMap<Box<str>, Quota>,
    /// Customers whose `quotas/` value is present but unreadable: refused (fail closed).
    bad_quotas: HashSet<Box<str>>,
    /// The (customer, API) pairs named in a scope of any key of the customer, with how
    /// many scopes name each: the only APIs its usage is metered under. Kept as keyed
    /// 64-bit hashes of the pair (about 20 bytes a pair, no strings): a collision could
    /// only meter one request under a real API name, and the random key keeps a
    /// client from aiming for one.
    apis: HashMap<u64, u32>,
    api_hasher: RandomState,
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

/// One parsed change: the slot, and `None` for a deletion, `Some(None)` for a value
/// that does not parse.
#[derive(Debug, Clone)]
pub enum Change {
    Key([u8; 32], Option<Option<KeyEntry>>),
    Customer(Box<str>, Option<Option<CustomerEntry>>),
    Quota(Box<str>, Option<Option<Quota>>),
    /// Other replicas' reports.
    Gateway,
    Other,
}

impl Change {
    /// Parses the value (`None`: deleted) of `relative` (a key relative to the prefix).
    pub fn parse(relative: &str, value: Option<&[u8]>) -> Self {
        match entries::slot(relative) {
            Slot::ApiKey(hash) => Change::Key(hash, value.map(entries::parse_key)),
            Slot::Customer(id) => Change::Customer(id.into(), value.map(entries::parse_customer)),
            Slot::Quota(id) => Change::Quota(id.into(), value.map(entries::parse_quota)),
            Slot::Gateway => Change::Gateway,
            Slot::Other => Change::Other,
        }
    }
}

fn put<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, k: K, v: Option<Option<V>>) -> Applied {
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

impl Index {
    /// Stores (`Some`) or removes (`None`) the value of `relative` (a key relative to the prefix).
    pub fn apply(&mut self, relative: &str, value: Option<&[u8]>) -> Applied {
        self.store(Change::parse(relative, value))
    }

    /// Stores a parsed change.
    pub fn store(&mut self, change: Change) -> Applied {
        match change {
            Change::Key(hash, value) => {
                let old = self.keys.remove(&hash);
                let applied = match value {
                    Some(Some(new)) => {
                        self.count_apis(&new, 1);
                        self.keys.insert(hash, new);
                        Applied::Changed
                    }
                    Some(None) => Applied::Invalid,
                    None => Applied::Changed,
                };
                // Counted out after the new entry was counted in, so an API that both
                // name never leaves the set.
                if let Some(old) = old {
                    self.count_apis(&old, -1);
                }
                applied
            }
            Change::Customer(id, value) => put(&mut self.customers, id, value),
            Change::Quota(id, value) => {
                let unreadable = matches!(value, Some(None));
                let applied = put(&mut self.quotas, id.clone(), value);
                if unreadable {
                    self.bad_quotas.insert(id);
                } else {
                    self.bad_quotas.remove(&id);
                }
                applied
            }
            Change::Gateway | Change::Other => Applied::Ignored,
        }
    }

    fn api_slot(&self, customer_id: &str, api: &str) -> u64 {
        let mut hasher = self.api_hasher.build_hasher();
        // `str`'s Hash ends each string with a terminator: the pair is unambiguous.
        customer_id.hash(&mut hasher);
        api.hash(&mut hasher);
        hasher.finish()
    }

    fn count_apis(&mut self, entry: &KeyEntry, delta: i32) {
        for scope in entry.scopes.iter().filter(|s| &***s != "*") {
            let slot = self.api_slot(&entry.customer_id, scope);
            let n = self.apis.entry(slot).or_default();
            *n = n.saturating_add_signed(delta);
            if *n == 0 {
                self.apis.remove(&slot);
            }
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

    /// True when the customer's `quotas/` value is present but unreadable.
    pub fn quota_unreadable(&self, customer_id: &str) -> bool {
        self.bad_quotas.contains(customer_id)
    }

    /// True when a scope of some key of the customer names `api`.
    pub fn knows_api(&self, customer_id: &str, api: &str) -> bool {
        self.apis.contains_key(&self.api_slot(customer_id, api))
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

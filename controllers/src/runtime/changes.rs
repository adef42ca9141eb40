//! Telling the events of a watch that matter from those that do not: an object passes
//! when a fingerprint of what matters about it differs from the last one seen (by uid);
//! a deletion always passes (the deleted object carries the fields of its last update,
//! which a fingerprint would take for no change). The watch's first list only seeds the
//! fingerprints: at start nothing passes for being seen the first time, since the bulk
//! comparison ([`crate::runtime::resync`]) decides which objects a start reconciles.

use std::collections::HashMap;

use kube::Resource;
use kube::runtime::watcher;

/// Remembers one fingerprint per object (by uid).
pub struct Changed<F> {
    seen: HashMap<u128, u64>,
    fingerprint: F,
    /// The first list has ended (its `InitDone` was seen).
    listed: bool,
}

impl<F> Changed<F> {
    pub fn new(fingerprint: F) -> Self {
        Self {
            seen: HashMap::new(),
            fingerprint,
            listed: false,
        }
    }

    /// The object of `event` when it changed what `fingerprint` covers, or was deleted.
    pub fn changed<'e, K>(&mut self, event: &'e watcher::Event<K>) -> Option<&'e K>
    where
        K: Resource,
        F: Fn(&K) -> u64,
    {
        match event {
            watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                let uid = uid_key(o.meta().uid.as_deref());
                let print = (self.fingerprint)(o);
                let changed = self.seen.insert(uid, print) != Some(print);
                (changed && self.listed).then_some(o)
            }
            watcher::Event::Delete(o) => {
                self.seen.remove(&uid_key(o.meta().uid.as_deref()));
                Some(o)
            }
            watcher::Event::InitDone => {
                self.listed = true;
                None
            }
            watcher::Event::Init => None,
        }
    }
}

/// An object's uid as a map key of 16 bytes and no allocation: the API server's uids
/// are UUIDs (anything else, never seen, is hashed).
pub fn uid_key(uid: Option<&str>) -> u128 {
    let uid = uid.unwrap_or_default();
    uuid::Uuid::parse_str(uid).map_or_else(
        |_| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            uid.hash(&mut h);
            u128::from(h.finish())
        },
        |u| u.as_u128(),
    )
}

/// A fingerprint of an object's spec (generation), finalizers and deletion: what a
/// status write leaves alone.
pub fn spec_fingerprint<K: Resource>(obj: &K) -> u64 {
    use std::hash::{Hash, Hasher};
    let meta = obj.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        meta.generation,
        &meta.finalizers,
        meta.deletion_timestamp.as_ref().map(|t| t.0),
    )
        .hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use m3o_crds::Customer;

    fn customer(uid: &str, generation: i64) -> Customer {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "m3o.com/v1alpha1", "kind": "Customer",
            "metadata": {"name": uid, "namespace": "ns", "uid": uid, "generation": generation},
            "spec": {"email": "c@example.com"},
        }))
        .expect("a valid Customer")
    }

    #[test]
    fn the_first_list_seeds_and_later_changes_pass() {
        let mut changes = Changed::new(spec_fingerprint::<Customer>);
        let passes =
            |changes: &mut Changed<_>, e: watcher::Event<Customer>| changes.changed(&e).is_some();
        assert!(!passes(&mut changes, watcher::Event::Init));
        assert!(!passes(
            &mut changes,
            watcher::Event::InitApply(customer("a", 1))
        ));
        assert!(!passes(&mut changes, watcher::Event::InitDone));
        // A status write (same generation) does not pass; a spec change does.
        assert!(!passes(
            &mut changes,
            watcher::Event::Apply(customer("a", 1))
        ));
        assert!(passes(
            &mut changes,
            watcher::Event::Apply(customer("a", 2))
        ));
        // A new object after the first list passes, and so does a change a relist finds.
        assert!(passes(
            &mut changes,
            watcher::Event::Apply(customer("b", 1))
        ));
        assert!(!passes(&mut changes, watcher::Event::Init));
        assert!(passes(
            &mut changes,
            watcher::Event::InitApply(customer("b", 2))
        ));
        assert!(!passes(
            &mut changes,
            watcher::Event::InitApply(customer("a", 2))
        ));
        assert!(passes(
            &mut changes,
            watcher::Event::Delete(customer("a", 2))
        ));
    }
}

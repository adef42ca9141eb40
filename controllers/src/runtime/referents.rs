//! Which objects reference each Customer (`spec.customerRef`), kept from a kind's own
//! watch events: a mapper or a slot decision looks up a Customer's referents instead of
//! scanning a cache or listing the API.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use m3o_crds::{ApiKey, Subscription};

use crate::runtime::relist::Relist;

/// Objects that name a Customer in `spec.customerRef`.
pub trait CustomerReferent: kube::Resource<DynamicType = ()> {
    fn customer_name(&self) -> &str;
}

impl CustomerReferent for Subscription {
    fn customer_name(&self) -> &str {
        &self.spec.customer_ref.name
    }
}

impl CustomerReferent for ApiKey {
    fn customer_name(&self) -> &str {
        &self.spec.customer_ref.name
    }
}

/// (namespace, name)
type Key = (String, String);

/// Which objects of one kind reference each Customer, kept from that kind's own watch
/// events: a mapper looks up the referents of a Customer instead of scanning a cache.
pub struct ByCustomer<K> {
    inner: Arc<Mutex<Index>>,
    _kind: std::marker::PhantomData<fn() -> K>,
}

impl<K> Clone for ByCustomer<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            _kind: std::marker::PhantomData,
        }
    }
}

impl<K> Default for ByCustomer<K> {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            _kind: std::marker::PhantomData,
        }
    }
}

/// The referents of one Customer: nearly always one, so a set (a B-tree node of some
/// 280 bytes) only once there are more.
enum Names {
    One(String),
    Many(BTreeSet<String>),
}

impl Names {
    fn insert(&mut self, name: String) {
        match self {
            Self::One(one) if *one == name => {}
            Self::One(one) => *self = Self::Many(BTreeSet::from([std::mem::take(one), name])),
            Self::Many(many) => {
                many.insert(name);
            }
        }
    }

    /// Removes `name`; false once none is left.
    fn remove(&mut self, name: &str) -> bool {
        match self {
            Self::One(one) => one != name,
            Self::Many(many) => {
                many.remove(name);
                if many.len() == 1
                    && let Some(last) = many.pop_first()
                {
                    *self = Self::One(last);
                }
                !matches!(self, Self::Many(m) if m.is_empty())
            }
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = &String> + '_> {
        match self {
            Self::One(one) => Box::new(std::iter::once(one)),
            Self::Many(many) => Box::new(many.iter()),
        }
    }
}

#[derive(Default)]
struct Index {
    /// (namespace, customer) -> names of referents.
    referents: HashMap<Key, Names>,
    /// (namespace, name) -> the customer it references.
    customer_of: HashMap<Key, String>,
    /// What a relist lists again (the rest is dropped at its end).
    relist: Relist<Key>,
}

impl Index {
    fn insert(&mut self, namespace: String, name: String, customer: String) {
        let key = (namespace, name);
        if self.customer_of.get(&key) == Some(&customer) {
            return;
        }
        self.remove(&key);
        match self.referents.entry((key.0.clone(), customer.clone())) {
            Entry::Occupied(mut names) => names.get_mut().insert(key.1.clone()),
            Entry::Vacant(slot) => {
                slot.insert(Names::One(key.1.clone()));
            }
        }
        self.customer_of.insert(key, customer);
    }

    fn remove(&mut self, key: &Key) {
        let Some(customer) = self.customer_of.remove(key) else {
            return;
        };
        let by = (key.0.clone(), customer);
        if let Some(names) = self.referents.get_mut(&by)
            && !names.remove(&key.1)
        {
            self.referents.remove(&by);
        }
    }
}

impl<K: CustomerReferent> ByCustomer<K> {
    /// Keeps the index in step with one event of the kind's watch.
    pub fn observe(&self, event: &watcher::Event<K>) {
        let Ok(mut guard) = self.inner.lock() else {
            return;
        };
        let index = &mut *guard;
        let key_of = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
        index.relist.follow(event, key_of);
        match event {
            watcher::Event::Init => {}
            watcher::Event::InitApply(o) | watcher::Event::Apply(o) => {
                let (namespace, name) = key_of(o);
                index.insert(namespace, name, o.customer_name().to_owned());
            }
            watcher::Event::Delete(o) => index.remove(&key_of(o)),
            watcher::Event::InitDone => {
                let gone = index
                    .relist
                    .lost(index.customer_of.keys(), |k| (*k).clone());
                let gone: Vec<Key> = gone.into_iter().cloned().collect();
                for key in &gone {
                    index.remove(key);
                }
            }
        }
    }

    /// The objects referencing Customer `namespace/customer`.
    pub fn referencing(&self, namespace: &str, customer: &str) -> Vec<ObjectRef<K>> {
        let Ok(index) = self.inner.lock() else {
            return Vec::new();
        };
        index
            .referents
            .get(&(namespace.to_owned(), customer.to_owned()))
            .into_iter()
            .flat_map(Names::iter)
            .map(|name| ObjectRef::new(name).within(namespace))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(ns: &str, name: &str, customer: &str) -> Subscription {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "m3o.com/v1alpha1",
            "kind": "Subscription",
            "metadata": {"namespace": ns, "name": name},
            "spec": {"customerRef": {"name": customer}, "plan": "pro"},
        }))
        .expect("a valid Subscription")
    }

    fn names(index: &ByCustomer<Subscription>, ns: &str, customer: &str) -> Vec<String> {
        index
            .referencing(ns, customer)
            .into_iter()
            .map(|r| r.name)
            .collect()
    }

    #[test]
    fn the_index_follows_applies_moves_deletes_and_relists() {
        let index = ByCustomer::<Subscription>::default();
        index.observe(&watcher::Event::Apply(sub("a", "s1", "c")));
        index.observe(&watcher::Event::Apply(sub("a", "s2", "c")));
        index.observe(&watcher::Event::Apply(sub("b", "s3", "c")));
        assert_eq!(names(&index, "a", "c"), ["s1", "s2"]);
        assert_eq!(names(&index, "b", "c"), ["s3"]);
        // s2 now references d: it leaves c.
        index.observe(&watcher::Event::Apply(sub("a", "s2", "d")));
        assert_eq!(names(&index, "a", "c"), ["s1"]);
        assert_eq!(names(&index, "a", "d"), ["s2"]);
        index.observe(&watcher::Event::Apply(sub("a", "s4", "c")));
        index.observe(&watcher::Event::Apply(sub("a", "s0", "c")));
        assert_eq!(names(&index, "a", "c"), ["s0", "s1", "s4"]);
        index.observe(&watcher::Event::Delete(sub("a", "s4", "c")));
        index.observe(&watcher::Event::Delete(sub("a", "s0", "c")));
        assert_eq!(names(&index, "a", "c"), ["s1"]);
        index.observe(&watcher::Event::Delete(sub("a", "s0", "c")));
        assert_eq!(names(&index, "a", "c"), ["s1"], "removing one not there");
        index.observe(&watcher::Event::Delete(sub("a", "s1", "c")));
        assert!(names(&index, "a", "c").is_empty());
        // A relist that no longer contains s3 drops it.
        index.observe(&watcher::Event::Init);
        index.observe(&watcher::Event::InitApply(sub("a", "s2", "d")));
        index.observe(&watcher::Event::InitDone);
        assert!(names(&index, "b", "c").is_empty());
        assert_eq!(names(&index, "a", "d"), ["s2"]);
    }
}

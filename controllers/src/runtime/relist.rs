//! Deletions lost during a relist. When a watch is interrupted, kube's watcher lists
//! again (`Init`, `InitApply`..., `InitDone`); an object deleted meanwhile is simply not
//! listed, and no `Delete` event ever comes for it. [`Relist`] remembers what a relist
//! listed, so that at its end the objects known before and not listed again can be
//! told apart. Used by the shared Customer feed, the referents index and the ApiKey's
//! Secret watch.

use std::collections::HashSet;
use std::hash::Hash;

use kube::runtime::watcher;

/// The keys (uid, namespace/name, ...) listed by the relist in progress, if any.
#[derive(Debug)]
pub struct Relist<K> {
    listed: Option<HashSet<K>>,
}

impl<K> Default for Relist<K> {
    fn default() -> Self {
        Self { listed: None }
    }
}

impl<K: Eq + Hash> Relist<K> {
    /// Follows one watch event: `Init` begins a relist, and the keys of the objects
    /// applied until its `InitDone` are remembered (`key` names an object).
    pub fn follow<O>(&mut self, event: &watcher::Event<O>, key: impl FnOnce(&O) -> K) {
        match event {
            watcher::Event::Init => self.listed = Some(HashSet::new()),
            watcher::Event::InitApply(o) | watcher::Event::Apply(o) => {
                if let Some(listed) = self.listed.as_mut() {
                    listed.insert(key(o));
                }
            }
            watcher::Event::Delete(_) | watcher::Event::InitDone => {}
        }
    }

    /// At `InitDone`: the `known` objects (what the caller knew before the relist, or
    /// knows now) that the relist did not list: deleted while the watch was down. Ends
    /// the relist; outside one, nothing is lost.
    pub fn lost<T>(&mut self, known: impl IntoIterator<Item = T>, key: impl Fn(&T) -> K) -> Vec<T> {
        let Some(listed) = self.listed.take() else {
            return Vec::new();
        };
        known
            .into_iter()
            .filter(|t| !listed.contains(&key(t)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Event = watcher::Event<(&'static str, u32)>;

    #[test]
    fn what_a_relist_does_not_list_is_lost_and_only_then() {
        let mut relist = Relist::<&str>::default();
        let key = |o: &(&'static str, u32)| o.0;
        // Outside a relist, nothing is remembered and nothing lost.
        relist.follow(&Event::Apply(("a", 1)), key);
        assert!(relist.lost(["a", "b"], |k| *k).is_empty());
        // A relist lists a and c: b, known before, was deleted meanwhile.
        relist.follow(&Event::Init, key);
        relist.follow(&Event::InitApply(("a", 2)), key);
        relist.follow(&Event::Delete(("c", 1)), key);
        relist.follow(&Event::InitApply(("c", 1)), key);
        assert_eq!(relist.lost(["a", "b", "c"], |k| *k), ["b"]);
        // The relist ended with its InitDone.
        assert!(relist.lost(["a", "b"], |k| *k).is_empty());
        // An empty relist loses everything known.
        relist.follow(&Event::Init, key);
        assert_eq!(relist.lost(vec![("a", 2)], |o| o.0), [("a", 2)]);
    }
}

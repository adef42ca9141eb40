//! Watching several namespaces as one (`--namespace a,b`): one watch per namespace
//! (so RBAC can be a Role per namespace), merged into the one event stream a
//! reflector store and a controller expect.
//!
//! Merging the raw streams is wrong: a relist (`Init`..`InitDone`) of one namespace
//! would replace the whole store and lose the other namespaces' objects. [`Merge`]
//! emits one `Init`..`InitDone` for the first lists of all namespaces together
//! (`InitDone` once every namespace has listed), and turns a later relist of one
//! namespace into `Apply` for what it lists and `Delete` for that namespace's objects
//! it did not list again. It keeps the last state of each object (a `Delete` must
//! carry the object: its consumers read its uid, owners and fields), so several
//! namespaces cost one more in-memory copy of the watched objects than one or all.
//! A later relist of one namespace ends in no `InitDone`, so it does not start the bulk
//! comparison a relist starts ([`crate::runtime::resync`]); its `Apply`s (changed
//! objects pass the change filters), its `Delete`s and the periodic resync do the rest.

use std::collections::{BTreeMap, BTreeSet};

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::runtime::watcher;

/// An object's name within its namespace.
type Name = String;

/// What the merge knows of one namespace's watch.
#[derive(Debug)]
struct Watched<K> {
    /// Its first list has ended.
    listed: bool,
    /// The objects it holds now (as far as the merged stream told).
    known: BTreeMap<Name, K>,
    /// During one of its relists after the first list: what it listed so far.
    relisting: Option<BTreeSet<Name>>,
}

/// The pure merge of per-namespace watch events (namespaces by index).
#[derive(Debug)]
pub struct Merge<K> {
    namespaces: Vec<Watched<K>>,
    /// The merged `Init` was emitted.
    began: bool,
    /// The merged `InitDone` was emitted: every namespace has listed once.
    done: bool,
    /// Deletions seen before the merged `InitDone` (a reflector drops a `Delete` while
    /// it buffers a list): emitted right after it.
    deferred: BTreeMap<(usize, Name), K>,
}

impl<K: Resource + Clone> Merge<K> {
    pub fn new(namespaces: usize) -> Self {
        Self {
            namespaces: (0..namespaces)
                .map(|_| Watched {
                    listed: false,
                    known: BTreeMap::new(),
                    relisting: None,
                })
                .collect(),
            began: false,
            done: false,
            deferred: BTreeMap::new(),
        }
    }

    /// The merged events for event `event` of namespace number `ns`.
    pub fn next(&mut self, ns: usize, event: watcher::Event<K>) -> Vec<watcher::Event<K>> {
        let Some(watched) = self.namespaces.get_mut(ns) else {
            return Vec::new();
        };
        let name = |o: &K| o.meta().name.clone().unwrap_or_default();
        if !self.done {
            // The first list of all: everything goes into the one list being buffered.
            return match event {
                watcher::Event::Init => {
                    // A namespace's list can restart (its watch failed mid-list): what
                    // it listed before and not again is deleted, as in a relist.
                    watched.relisting = Some(BTreeSet::new());
                    if std::mem::replace(&mut self.began, true) {
                        Vec::new()
                    } else {
                        vec![watcher::Event::Init]
                    }
                }
                watcher::Event::InitApply(o) | watcher::Event::Apply(o) => {
                    if let Some(listed) = watched.relisting.as_mut() {
                        listed.insert(name(&o));
                    }
                    watched.known.insert(name(&o), o.clone());
                    self.deferred.remove(&(ns, name(&o)));
                    vec![watcher::Event::InitApply(o)]
                }
                watcher::Event::Delete(o) => {
                    watched.known.remove(&name(&o));
                    if let Some(listed) = watched.relisting.as_mut() {
                        listed.remove(&name(&o));
                    }
                    self.deferred.insert((ns, name(&o)), o);
                    Vec::new()
                }
                watcher::Event::InitDone => {
                    watched.listed = true;
                    for (n, o) in watched.lost() {
                        self.deferred.insert((ns, n), o);
                    }
                    if !self.namespaces.iter().all(|w| w.listed) {
                        return Vec::new();
                    }
                    self.done = true;
                    let deferred = std::mem::take(&mut self.deferred);
                    std::iter::once(watcher::Event::InitDone)
                        .chain(deferred.into_values().map(watcher::Event::Delete))
                        .collect()
                }
            };
        }
        match event {
            watcher::Event::Init => {
                watched.relisting = Some(BTreeSet::new());
                Vec::new()
            }
            watcher::Event::InitApply(o) | watcher::Event::Apply(o) => {
                if let Some(listed) = watched.relisting.as_mut() {
                    listed.insert(name(&o));
                }
                watched.known.insert(name(&o), o.clone());
                vec![watcher::Event::Apply(o)]
            }
            watcher::Event::Delete(o) => {
                watched.known.remove(&name(&o));
                if let Some(listed) = watched.relisting.as_mut() {
                    listed.remove(&name(&o));
                }
                vec![watcher::Event::Delete(o)]
            }
            watcher::Event::InitDone => watched
                .lost()
                .into_values()
                .map(watcher::Event::Delete)
                .collect(),
        }
    }
}

impl<K> Watched<K> {
    /// At the end of a (re)list: the objects known before and not listed again
    /// (deleted while the watch was down), forgotten. Nothing outside a relist.
    fn lost(&mut self) -> BTreeMap<Name, K> {
        let Some(listed) = self.relisting.take() else {
            return BTreeMap::new();
        };
        let (kept, lost) = std::mem::take(&mut self.known)
            .into_iter()
            .partition(|(n, _)| listed.contains(n));
        self.known = kept;
        lost
    }
}

/// The watches of `namespaces` (each made by `watch`), merged by [`Merge`].
pub fn merged<K, S>(
    namespaces: Vec<S>,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + Unpin + 'static,
{
    let mut merge = Merge::new(namespaces.len());
    let tagged = namespaces
        .into_iter()
        .enumerate()
        .map(|(ns, s)| s.map(move |e| (ns, e)));
    futures::stream::select_all(tagged).flat_map(move |(ns, event)| {
        let out: Vec<Result<watcher::Event<K>, watcher::Error>> = match event {
            Ok(event) => merge.next(ns, event).into_iter().map(Ok).collect(),
            Err(err) => vec![Err(err)],
        };
        futures::stream::iter(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    fn cm(ns: &str, name: &str, rv: &str) -> ConfigMap {
        let mut o = ConfigMap::default();
        o.metadata.namespace = Some(ns.into());
        o.metadata.name = Some(name.into());
        o.metadata.resource_version = Some(rv.into());
        o
    }

    /// The merged events in a short form: kind letter and namespace/name.
    fn short(events: &[Event<ConfigMap>]) -> Vec<String> {
        let of = |o: &ConfigMap| {
            format!(
                "{}/{}",
                o.metadata.namespace.as_deref().unwrap_or_default(),
                o.metadata.name.as_deref().unwrap_or_default()
            )
        };
        events
            .iter()
            .map(|e| match e {
                Event::Init => "Init".to_owned(),
                Event::InitApply(o) => format!("InitApply {}", of(o)),
                Event::Apply(o) => format!("Apply {}", of(o)),
                Event::Delete(o) => format!("Delete {}", of(o)),
                Event::InitDone => "InitDone".to_owned(),
            })
            .collect()
    }

    /// Feeds `(namespace number, event)` pairs through a merge and a reflector store;
    /// returns the merged events and the store's `namespace/name`s.
    fn run(
        merge: &mut Merge<ConfigMap>,
        writer: &mut reflector::store::Writer<ConfigMap>,
        input: Vec<(usize, Event<ConfigMap>)>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        for (ns, event) in input {
            for merged in merge.next(ns, event) {
                writer.apply_watcher_event(&merged);
                out.push(merged);
            }
        }
        short(&out)
    }

    fn names(store: &reflector::Store<ConfigMap>) -> Vec<String> {
        let mut names: Vec<String> = store
            .state()
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o.metadata.namespace.as_deref().unwrap_or_default(),
                    o.metadata.name.as_deref().unwrap_or_default()
                )
            })
            .collect();
        names.sort();
        names
    }

    fn first_lists(merge: &mut Merge<ConfigMap>, w: &mut reflector::store::Writer<ConfigMap>) {
        run(
            merge,
            w,
            vec![
                (0, Event::Init),
                (0, Event::InitApply(cm("a", "x", "1"))),
                (0, Event::InitApply(cm("a", "y", "1"))),
                (0, Event::InitDone),
                (1, Event::Init),
                (1, Event::InitApply(cm("b", "x", "1"))),
                (1, Event::InitDone),
            ],
        );
    }

    #[test]
    fn one_list_ends_once_every_namespace_has_listed() {
        let (store, mut w) = reflector::store();
        let mut merge = Merge::new(2);
        let out = run(
            &mut merge,
            &mut w,
            vec![
                (0, Event::Init),
                (1, Event::Init),
                (0, Event::InitApply(cm("a", "x", "1"))),
                (0, Event::InitDone),
                // a watches on while b still lists: into the same list.
                (0, Event::Apply(cm("a", "y", "1"))),
                (1, Event::InitApply(cm("b", "x", "1"))),
            ],
        );
        assert_eq!(
            out,
            ["Init", "InitApply a/x", "InitApply a/y", "InitApply b/x"]
        );
        assert!(names(&store).is_empty(), "nothing is listed before b is");
        let out = run(&mut merge, &mut w, vec![(1, Event::InitDone)]);
        assert_eq!(out, ["InitDone"]);
        assert_eq!(names(&store), ["a/x", "a/y", "b/x"]);
    }

    #[test]
    fn a_deletion_during_the_first_lists_is_not_lost() {
        let (store, mut w) = reflector::store();
        let mut merge = Merge::new(2);
        let out = run(
            &mut merge,
            &mut w,
            vec![
                (0, Event::Init),
                (0, Event::InitApply(cm("a", "x", "1"))),
                (0, Event::InitApply(cm("a", "y", "1"))),
                (0, Event::InitDone),
                (0, Event::Delete(cm("a", "x", "2"))),
                (1, Event::Init),
                (1, Event::InitDone),
            ],
        );
        assert_eq!(
            out,
            [
                "Init",
                "InitApply a/x",
                "InitApply a/y",
                "InitDone",
                "Delete a/x"
            ]
        );
        assert_eq!(names(&store), ["a/y"]);
    }

    #[test]
    fn a_restarted_first_list_drops_what_it_no_longer_lists() {
        let (store, mut w) = reflector::store();
        let mut merge = Merge::new(2);
        run(
            &mut merge,
            &mut w,
            vec![
                (0, Event::Init),
                (0, Event::InitApply(cm("a", "x", "1"))),
                // a's list failed and restarts: x is gone meanwhile.
                (0, Event::Init),
                (0, Event::InitApply(cm("a", "y", "1"))),
                (0, Event::InitDone),
                (1, Event::Init),
                (1, Event::InitDone),
            ],
        );
        assert_eq!(names(&store), ["a/y"]);
    }

    #[test]
    fn a_relist_of_one_namespace_leaves_the_others_alone() {
        let (store, mut w) = reflector::store();
        let mut merge = Merge::new(2);
        first_lists(&mut merge, &mut w);
        assert_eq!(names(&store), ["a/x", "a/y", "b/x"]);
        // b's watch broke; it lists again with nothing new: a's objects stay.
        let out = run(
            &mut merge,
            &mut w,
            vec![
                (1, Event::Init),
                (1, Event::InitApply(cm("b", "x", "1"))),
                (1, Event::InitDone),
            ],
        );
        assert_eq!(out, ["Apply b/x"]);
        assert_eq!(names(&store), ["a/x", "a/y", "b/x"]);
    }

    #[test]
    fn a_relist_emits_the_deletions_it_reveals_in_its_namespace_only() {
        let (store, mut w) = reflector::store();
        let mut merge = Merge::new(2);
        first_lists(&mut merge, &mut w);
        // a/x was deleted while a's watch was down; a/z created. b also has an x.
        let out = run(
            &mut merge,
            &mut w,
            vec![
                (0, Event::Init),
                (0, Event::InitApply(cm("a", "y", "2"))),
                // b goes on meanwhile.
                (1, Event::Apply(cm("b", "z", "1"))),
                (0, Event::InitApply(cm("a", "z", "1"))),
                (0, Event::InitDone),
            ],
        );
        assert_eq!(out, ["Apply a/y", "Apply b/z", "Apply a/z", "Delete a/x"]);
        assert_eq!(names(&store), ["a/y", "a/z", "b/x", "b/z"]);
        // The Delete carries the object as last seen.
        let deleted = merge.next(0, Event::Init);
        assert!(deleted.is_empty());
        let out = merge.next(0, Event::InitDone);
        assert_eq!(short(&out), ["Delete a/y", "Delete a/z"]);
        match &out[0] {
            Event::Delete(o) => assert_eq!(o.metadata.resource_version.as_deref(), Some("2")),
            other => panic!("expected a Delete, got {other:?}"),
        }
        // And once only: a further relist of nothing loses nothing more.
        assert!(merge.next(0, Event::Init).is_empty());
        assert!(merge.next(0, Event::InitDone).is_empty());
    }

    #[test]
    fn a_deletion_watched_during_a_relist_is_not_emitted_twice() {
        let (_store, mut w) = reflector::store();
        let mut merge = Merge::new(2);
        first_lists(&mut merge, &mut w);
        let out = run(
            &mut merge,
            &mut w,
            vec![
                (0, Event::Init),
                (0, Event::InitApply(cm("a", "x", "2"))),
                (0, Event::Delete(cm("a", "x", "3"))),
                (0, Event::InitDone),
            ],
        );
        assert_eq!(out, ["Apply a/x", "Delete a/x", "Delete a/y"]);
    }

    #[tokio::test]
    async fn merged_streams_pass_errors_and_merge_events() {
        let a = futures::stream::iter(vec![
            Ok(Event::Init),
            Ok(Event::InitApply(cm("a", "x", "1"))),
            Ok(Event::InitDone),
        ]);
        let b = futures::stream::iter(vec![
            Err(watcher::Error::NoResourceVersion),
            Ok(Event::Init),
            Ok(Event::InitDone),
        ]);
        let out: Vec<_> = merged(vec![a, b]).collect().await;
        assert_eq!(out.iter().filter(|e| e.is_err()).count(), 1);
        let events: Vec<Event<ConfigMap>> = out.into_iter().filter_map(Result::ok).collect();
        assert_eq!(short(&events), ["Init", "InitApply a/x", "InitDone"]);
    }
}

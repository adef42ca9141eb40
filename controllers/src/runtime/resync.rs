//! The bulk comparison: at start, after every relist of the kind's watch, and every
//! resync interval, each kind's cache is compared, a page of 500 objects per statement,
//! with the records in Postgres, and only the objects that need it are reconciled (see
//! [`due`]). A provisioned object is otherwise left alone: etcd is kept by the drift
//! watcher, the Secrets are watched, and a record edited by hand is found by its
//! digest. So a start, a relist or a resync over an unchanged fleet costs a statement
//! per 500 objects, not a reconcile per object. Between relists, a periodic comparison
//! reads only the versions of records it found in order before ([`Verified`]), so an
//! unchanged fleet at rest is not read whole, nor digested, every interval.

use std::collections::HashSet;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use tokio::sync::watch;

use crate::plans::Catalog;
use crate::report::status::HasStatus;
use crate::runtime::context::Context;
use crate::runtime::finalizer::FINALIZER;
use crate::store::resync::{self as records, LiveRecords, RecordTable, ResourceKey};

/// Objects compared per statement.
const PAGE: usize = 500;

/// A kind whose objects each have records in one table. Implemented by each kind.
pub trait ResyncedKind: HasStatus {
    const RECORDS: RecordTable;

    /// The digest of the record the object asks for now, when it can be told without
    /// I/O (from the object, the catalog and the live record); `None` when the kind's
    /// plan needs more (then a spec change shows as a generation not yet Ready, and
    /// the other inputs reach the object through their own triggers).
    fn planned_digest(&self, _catalog: &Catalog, _records: &LiveRecords) -> Option<String> {
        None
    }

    /// True when a pass of the object would only wait, quietly, for its Customer to be
    /// provisioned (a dependent of a Customer applied with it): the bulk lane does not
    /// schedule it for its own event, nor the bulk comparison for being not Ready,
    /// since its Customer's change reaches it through the shared feed. A deletion is
    /// always scheduled.
    fn waits_for_customer(&self, _ctx: &crate::runtime::context::Context) -> bool {
        false
    }
}

/// Why an object is reconciled after a bulk comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Its deletion has begun, or the finalizer is missing.
    Lifecycle,
    /// Its status does not say Ready at its generation (changed, blocked or failed).
    NotReady,
    /// No live record.
    NoRecord,
    /// A live record differs from its plan: edited by hand, or the plan changed
    /// (e.g. the catalog) while nothing else did. The reconcile repairs it.
    RecordDiffers,
}

/// Whether (and why) an object needs a reconcile, given its live records (`None`:
/// none) and the digest it plans now (see [`ResyncedKind::planned_digest`]).
pub fn due_for<K: HasStatus>(
    obj: &K,
    records: Option<&LiveRecords>,
    planned: Option<String>,
) -> Option<Due> {
    let meta = obj.meta();
    let finalized = meta.finalizers.iter().flatten().any(|f| f == FINALIZER);
    if meta.deletion_timestamp.is_some() || !finalized {
        return Some(Due::Lifecycle);
    }
    let ready_at_generation = obj.is_ready()
        && obj.ready_condition().and_then(|c| c.observed_generation) == meta.generation;
    if !ready_at_generation {
        return Some(Due::NotReady);
    }
    let Some(records) = records else {
        return Some(Due::NoRecord);
    };
    let plan_changed = planned.is_some_and(|p| records.plan_digest.as_deref() != Some(&p));
    (records.edited || plan_changed).then_some(Due::RecordDiffers)
}

/// The objects of `cache` that are [`due_for`] a reconcile: after each relist of the
/// kind's watch (`relisted` changes at its end, the first time at start) and every
/// resync interval.
pub fn due<K>(
    ctx: Arc<Context>,
    kind: &'static str,
    cache: Store<K>,
    relisted: watch::Receiver<u64>,
) -> impl Stream<Item = ObjectRef<K>> + Send + 'static
where
    K: ResyncedKind + Send + Sync + 'static,
{
    futures::stream::unfold(
        (ctx, cache, Some(relisted), Verified::default()),
        move |(ctx, cache, mut relisted, mut verified)| async move {
            let interval = tokio::time::sleep(ctx.settings.resync_interval);
            match relisted.as_mut() {
                Some(rx) => tokio::select! {
                    () = interval => {}
                    changed = rx.changed() => {
                        if changed.is_err() {
                            // The watch is gone: the interval alone from now on.
                            relisted = None;
                        }
                        // A start or a relist reads every record again.
                        verified = Verified::default();
                    },
                },
                None => interval.await,
            }
            let due = match compare(&ctx, kind, &cache, &mut verified).await {
                Ok(due) => due,
                Err(err) => {
                    tracing::warn!(%err, kind, "bulk comparison could not read the records; next interval");
                    verified = Verified::default();
                    Vec::new()
                }
            };
            ctx.metrics.resync_due(kind, due.len());
            Some((futures::stream::iter(due), (ctx, cache, relisted, verified)))
        },
    )
    .flatten()
}

/// What the last comparison found in order: a fingerprint of each object that was not
/// due, of its `resourceVersion` and of the versions of its records
/// ([`records::RowVersions`]), under one plan catalog. An object whose fingerprint is
/// unchanged was neither changed nor were its records written since: the next
/// comparison reads only the records' versions, not their content, and digests
/// nothing. 8 bytes an object; emptied at each start and relist, and when the catalog
/// or the Postgres server run ([`records::server_run`]) changes.
#[derive(Default)]
struct Verified {
    catalog: Option<Arc<Catalog>>,
    server_run: Option<String>,
    objects: HashSet<u64>,
}

impl Verified {
    fn fingerprint<K: Resource>(obj: &K, versions: &records::RowVersions) -> u64 {
        use std::hash::{Hash, Hasher};
        let meta = obj.meta();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&meta.uid, &meta.resource_version, versions).hash(&mut h);
        h.finish()
    }
}

async fn compare<K: ResyncedKind>(
    ctx: &Context,
    kind: &'static str,
    cache: &Store<K>,
    verified: &mut Verified,
) -> Result<Vec<ObjectRef<K>>, sqlx::Error> {
    let catalog = ctx.plans.current();
    let server_run = records::server_run(&ctx.db).await?;
    // A new catalog may change what a record should hold, another server run may reuse
    // row versions: everything is read again.
    let same_catalog = verified
        .catalog
        .as_ref()
        .is_some_and(|c| Arc::ptr_eq(c, &catalog));
    if !same_catalog || verified.server_run.as_ref() != Some(&server_run) {
        *verified = Verified {
            catalog: Some(catalog.clone()),
            server_run: Some(server_run),
            objects: HashSet::new(),
        };
    }
    let mut still_verified = HashSet::new();
    let mut due = Vec::new();
    let mut differing = 0;
    for page in cache.state().chunks(PAGE) {
        let keys: Vec<ResourceKey> = page
            .iter()
            .map(|o| (o.namespace().unwrap_or_default(), o.name_any()))
            .collect();
        // Objects and records unchanged since found in order: not read again.
        let mut to_read: Vec<usize> = (0..page.len()).collect();
        if !verified.objects.is_empty() {
            // The whole page: `versions[i]` is `page[i]`'s.
            let (namespaces, names): (Vec<String>, Vec<String>) = keys.iter().cloned().unzip();
            let versions = records::row_versions(&ctx.db, K::RECORDS, &namespaces, &names).await?;
            to_read.retain(|&i| {
                let Some(Some(versions)) = versions.get(i) else {
                    return true;
                };
                let print = Verified::fingerprint(page[i].as_ref(), versions);
                let unchanged = verified.objects.contains(&print);
                if unchanged {
                    still_verified.insert(print);
                }
                !unchanged
            });
        }
        if to_read.is_empty() {
            continue;
        }
        let (namespaces, names) = columns(&keys, &to_read);
        let live = records::live_records(&ctx.db, K::RECORDS, &namespaces, &names).await?;
        for i in to_read {
            let (obj, key) = (&page[i], &keys[i]);
            let records = live.get(key);
            let planned = records.and_then(|r| obj.planned_digest(&catalog, r));
            match due_for(obj.as_ref(), records, planned) {
                None => {
                    if let Some(records) = records {
                        still_verified
                            .insert(Verified::fingerprint(obj.as_ref(), &records.versions));
                    }
                }
                // Not Ready because its Customer is still being provisioned: the feed
                // wakes it when that changes (a pass now would only wait).
                Some(Due::NotReady) if obj.waits_for_customer(ctx) => {}
                Some(why) => {
                    if why == Due::RecordDiffers {
                        differing += 1;
                        tracing::info!(kind, namespace = %key.0, object = %key.1,
                            "record differs from its plan; reconciling to repair it");
                    }
                    due.push(ObjectRef::from_obj(obj.as_ref()));
                }
            }
        }
    }
    verified.objects = still_verified;
    ctx.metrics.rows_repaired(kind, differing);
    Ok(due)
}

/// The namespaces and names of `keys[i]` for each `i` of `picked`, as two arrays.
fn columns(keys: &[ResourceKey], picked: &[usize]) -> (Vec<String>, Vec<String>) {
    picked.iter().map(|&i| keys[i].clone()).unzip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use m3o_crds::Customer;

    fn customer(generation: i64, ready: Option<(&str, i64)>) -> Customer {
        let conditions = ready.map_or(serde_json::json!([]), |(status, g)| {
            serde_json::json!([{"type": "Ready", "status": status, "reason": "Provisioned",
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": g}])
        });
        serde_json::from_value(serde_json::json!({
            "apiVersion": "m3o.com/v1alpha1", "kind": "Customer",
            "metadata": {"name": "c", "namespace": "ns", "generation": generation,
                "finalizers": [FINALIZER]},
            "spec": {"email": "c@example.com"},
            "status": {"conditions": conditions},
        }))
        .expect("a valid Customer")
    }

    fn written(digest: &str) -> LiveRecords {
        LiveRecords {
            edited: false,
            plan_digest: Some(digest.into()),
            customer_id: None,
            versions: Vec::new(),
        }
    }

    #[test]
    fn only_objects_that_need_it_are_due() {
        let ready = customer(2, Some(("True", 2)));
        let plan = || Some("d1".to_owned());
        assert_eq!(due_for(&ready, Some(&written("d1")), plan()), None);
        assert_eq!(
            due_for(&ready, Some(&written("d1")), None),
            None,
            "kind plans no digest"
        );
        assert_eq!(due_for(&ready, None, None), Some(Due::NoRecord));
        let changed = customer(3, Some(("True", 2)));
        assert_eq!(
            due_for(&changed, Some(&written("d1")), plan()),
            Some(Due::NotReady)
        );
        let failed = customer(2, Some(("False", 2)));
        assert_eq!(
            due_for(&failed, Some(&written("d1")), plan()),
            Some(Due::NotReady)
        );
        assert_eq!(due_for(&customer(1, None), None, None), Some(Due::NotReady));
        let mut unfinalized = ready.clone();
        unfinalized.metadata.finalizers = None;
        assert_eq!(
            due_for(&unfinalized, Some(&written("d1")), plan()),
            Some(Due::Lifecycle)
        );
    }

    #[test]
    fn a_record_edited_by_hand_or_planned_differently_now_is_due() {
        let ready = customer(2, Some(("True", 2)));
        // Edited by hand: the content no longer matches the stored digest.
        let edited = LiveRecords {
            edited: true,
            ..written("d1")
        };
        assert_eq!(
            due_for(&ready, Some(&edited), Some("d1".into())),
            Some(Due::RecordDiffers)
        );
        assert_eq!(
            due_for(&ready, Some(&edited), None),
            Some(Due::RecordDiffers)
        );
        // The plan changed (the catalog) while the row and the object did not.
        assert_eq!(
            due_for(&ready, Some(&written("d1")), Some("d2".into())),
            Some(Due::RecordDiffers)
        );
        // Written before digests.
        let undigested = LiveRecords {
            plan_digest: None,
            ..written("d1")
        };
        assert_eq!(
            due_for(&ready, Some(&undigested), Some("d1".into())),
            Some(Due::RecordDiffers)
        );
    }
}

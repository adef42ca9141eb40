//! The periodic resync, in bulk: every resync interval each kind's cache is compared,
//! a page of 500 objects per statement, with the records in Postgres, and only the
//! objects that need it are reconciled: no live record, or not Ready at their
//! generation. A provisioned object is otherwise left alone between changes: etcd is
//! kept by the drift watcher, the Secrets are watched, and the writer fence refuses
//! hand edits of the records. So a resync of an unchanged fleet costs a statement per
//! 500 objects, not a reconcile per object.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use m3o_crds::{ApiKey, Customer, Subscription};

use crate::report::status::HasStatus;
use crate::runtime::context::Context;
use crate::store::resync::{self as records, RecordTable};

/// Objects compared per statement.
const PAGE: usize = 500;

/// A kind whose objects each have records in one table.
pub trait ResyncedKind: HasStatus {
    const RECORDS: RecordTable;
}

impl ResyncedKind for Customer {
    const RECORDS: RecordTable = records::CUSTOMERS;
}
impl ResyncedKind for Subscription {
    const RECORDS: RecordTable = records::SUBSCRIPTIONS;
}
impl ResyncedKind for ApiKey {
    const RECORDS: RecordTable = records::API_KEYS;
}

/// True when an object needs a reconcile at a resync: it has no live record, or its
/// status does not say Ready at its current generation (a blocked or failed object is
/// retried; a blocked one also on its own schedule).
pub fn needs_reconcile<K: HasStatus>(obj: &K, has_live_record: bool) -> bool {
    let ready_at_generation = obj.is_ready()
        && obj.ready_condition().and_then(|c| c.observed_generation) == obj.meta().generation;
    !has_live_record || !ready_at_generation
}

/// Every resync interval, the objects of `cache` that [`needs_reconcile`].
pub fn due<K>(
    ctx: Arc<Context>,
    kind: &'static str,
    cache: Store<K>,
) -> impl Stream<Item = ObjectRef<K>> + Send + 'static
where
    K: ResyncedKind + Send + Sync + 'static,
{
    futures::stream::unfold((ctx, cache), move |(ctx, cache)| async move {
        tokio::time::sleep(ctx.settings.resync_interval).await;
        let due = match compare(&ctx, &cache).await {
            Ok(due) => due,
            Err(err) => {
                tracing::warn!(%err, kind, "resync could not read the records; next interval");
                Vec::new()
            }
        };
        ctx.metrics.resync_due(kind, due.len());
        Some((futures::stream::iter(due), (ctx, cache)))
    })
    .flatten()
}

async fn compare<K: ResyncedKind>(
    ctx: &Context,
    cache: &Store<K>,
) -> Result<Vec<ObjectRef<K>>, sqlx::Error> {
    let mut due = Vec::new();
    for page in cache.state().chunks(PAGE) {
        let (namespaces, names): (Vec<String>, Vec<String>) = page
            .iter()
            .map(|o| (o.namespace().unwrap_or_default(), o.name_any()))
            .unzip();
        let live = records::live_refs(&ctx.db, K::RECORDS, &namespaces, &names).await?;
        for (obj, key) in page.iter().zip(namespaces.into_iter().zip(names)) {
            if needs_reconcile(obj.as_ref(), live.contains(&key)) {
                due.push(ObjectRef::from_obj(obj.as_ref()));
            }
        }
    }
    Ok(due)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(generation: i64, ready: Option<(&str, i64)>) -> Customer {
        let conditions = ready.map_or(serde_json::json!([]), |(status, g)| {
            serde_json::json!([{"type": "Ready", "status": status, "reason": "Provisioned",
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": g}])
        });
        serde_json::from_value(serde_json::json!({
            "apiVersion": "m3o.com/v1alpha1", "kind": "Customer",
            "metadata": {"name": "c", "namespace": "ns", "generation": generation},
            "spec": {"email": "c@example.com"},
            "status": {"conditions": conditions},
        }))
        .expect("a valid Customer")
    }

    #[test]
    fn only_objects_without_a_record_or_not_ready_at_their_generation_are_due() {
        assert!(!needs_reconcile(&customer(2, Some(("True", 2))), true));
        assert!(
            needs_reconcile(&customer(2, Some(("True", 2))), false),
            "record gone"
        );
        assert!(
            needs_reconcile(&customer(3, Some(("True", 2))), true),
            "changed since"
        );
        assert!(
            needs_reconcile(&customer(2, Some(("False", 2))), true),
            "failed"
        );
        assert!(needs_reconcile(&customer(1, None), true), "never reported");
    }
}

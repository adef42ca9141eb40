//! Running a controller for any kind: watch scope, concurrency, metrics, the failure
//! status, and per-object backoff, in one place.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kube::runtime::controller::{Action, Config};
use kube::runtime::events::EventType as K8sEventType;
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Api, Resource, ResourceExt};
use tracing::Instrument;

use crate::report::error::Error;
use crate::report::status::{self, Cond, HasStatus, types};
use crate::runtime::context::Context;

/// Changes to one object within this window collapse into one reconcile.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Retry delay after a lost race ([`Error::Transient`]): the winner's write is already
/// visible, so the next pass resolves it; no growing backoff.
const TRANSIENT_RETRY: Duration = Duration::from_millis(250);

/// The APIs of `K` in the watched namespaces, or the one API of all namespaces.
pub fn scoped_apis<K>(ctx: &Context) -> Vec<Api<K>>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    let namespaces = ctx.settings.watched_namespaces();
    if namespaces.is_empty() {
        return vec![Api::all(ctx.client.clone())];
    }
    namespaces
        .into_iter()
        .map(|ns| Api::namespaced(ctx.client.clone(), ns))
        .collect()
}

/// The watch of `K` in the watched scope, with the default backoff: one watch per
/// watched namespace, merged ([`crate::runtime::namespaces`]), or one watch.
pub fn scoped_watch<K>(
    ctx: &Context,
    config: watcher::Config,
) -> futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let mut watches: Vec<_> = scoped_apis::<K>(ctx)
        .into_iter()
        .map(|api| watcher(api, config.clone()).default_backoff().boxed())
        .collect();
    match watches.pop() {
        Some(only) if watches.is_empty() => only,
        Some(last) => {
            watches.push(last);
            crate::runtime::namespaces::merged(watches).boxed()
        }
        None => futures::stream::empty().boxed(),
    }
}

/// The watch configuration of every watch: this operator's shard only, when sharded.
pub fn watch_config(ctx: &Context) -> watcher::Config {
    match &ctx.settings.shard {
        Some(shard) => watcher::Config::default().labels(shard.as_str()),
        None => watcher::Config::default(),
    }
}

/// Watched objects are kept without `managedFields` and without kubectl's
/// `last-applied-configuration` annotation (a second copy of the spec): nothing here
/// reads them, and they are often the larger part of an object held in a cache.
pub fn strip_unread_metadata<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Changes of Customers that matter to their dependents (Subscriptions, ApiKeys): the
/// spec, the generation its record was last written for (a dependent reads the record,
/// so it must look again once a change reached it), readiness, state, the record id,
/// labels, and the object itself (uid) - not every status write of the Customer
/// controller, nor its finalizer (added in the pass that provisions, just before the
/// status that matters; a deletion moves the generation), nor a Customer still being
/// provisioned (`provisioning`: its dependents would only wait). A deletion always passes: the deleted
/// object carries the fields of its last update, which a filter would take for no
/// change.
pub fn customer_changes(
    events: impl futures::Stream<Item = Result<watcher::Event<m3o_crds::Customer>, watcher::Error>>
    + Send
    + 'static,
    provisioning: fn(&m3o_crds::Customer) -> bool,
) -> impl futures::Stream<Item = Result<m3o_crds::Customer, watcher::Error>> + Send + 'static {
    fn meaningful(c: &m3o_crds::Customer) -> u64 {
        use std::hash::{Hash, Hasher};
        let status = c.status.as_ref();
        let ready = c.ready_condition().map(|r| r.status.clone());
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            &c.metadata.uid,
            c.metadata.generation,
            &c.metadata.labels,
            ready,
            status.and_then(|s| s.observed_generation),
            status.and_then(|s| s.state.map(|st| st.as_str())),
            status.and_then(|s| s.customer_id.as_ref()),
        )
            .hash(&mut h);
        h.finish()
    }
    let mut changes = crate::runtime::changes::Changed::new(meaningful);
    // What a relist passes is held until its end: the cache the dependents read takes
    // the relisted objects in at once, at `InitDone`, and a dependent woken before
    // would read the Customer as it was before the relist.
    let mut relisting: Option<Vec<m3o_crds::Customer>> = None;
    events.flat_map(move |event| {
        let passed: Vec<_> = match event {
            Ok(event) => {
                // Recorded either way, so its next change (Ready) passes.
                let changed = changes.changed(&event).cloned();
                // A Customer being provisioned (created, no Ready condition yet) would
                // only make its dependents wait: they look when it is Ready.
                let waits = matches!(
                    &event,
                    watcher::Event::Apply(c) | watcher::Event::InitApply(c) if provisioning(c)
                );
                let changed = changed.filter(|_| !waits);
                match (&event, relisting.as_mut()) {
                    // A relist that restarts keeps what the interrupted one held.
                    (watcher::Event::Init, None) => {
                        relisting = Some(Vec::new());
                        Vec::new()
                    }
                    (watcher::Event::InitApply(_), Some(held)) => {
                        held.extend(changed);
                        Vec::new()
                    }
                    (watcher::Event::InitDone, _) => relisting
                        .take()
                        .unwrap_or_default()
                        .into_iter()
                        .map(Ok)
                        .collect(),
                    _ => changed.into_iter().map(Ok).collect(),
                }
            }
            Err(err) => vec![Err(err)],
        };
        futures::stream::iter(passed)
    })
}

/// The backoff key of an object: kinds share names, not failure counts.
fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Runs the controller of `K` with `reconcile` until `shutdown` resolves, with
/// `customise` adding triggers to the controller before it starts (for
/// kinds that depend on other objects: `Controller::watches`, `reconcile_all_on`), and
/// `observe` seeing every event of the kind's watch (to keep an index).
pub async fn run_with<K, F, Fut>(
    ctx: Arc<Context>,
    kind: &'static str,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    reconcile: F,
    mut observe: impl FnMut(&watcher::Event<K>) + Send + 'static,
    customise: impl FnOnce(Controller<K>) -> Controller<K>,
) where
    K: crate::runtime::resync::ResyncedKind
        + Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Send
        + Sync
        + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    // The watch stream is built here (not by Controller::new) to see its InitDone:
    // that is when this kind is listed and watching, which `/readyz` reports.
    let (cache, writer) = reflector::store();
    let watching = ctx.watching.clone();
    let events = scoped_watch::<K>(&ctx, watch_config(&ctx).any_semantic())
        .modify(strip_unread_metadata)
        .inspect(move |event| {
            if let Ok(event) = event {
                observe(event);
            }
            if matches!(event, Ok(watcher::Event::InitDone)) {
                tracing::info!(kind, "listed; watching");
                watching.mark(kind);
            }
        });
    let events = reflector(writer, events);
    run_on(ctx, kind, shutdown, reconcile, events, cache, customise).await;
}

/// What a change must touch to be reconciled: the spec (generation; it also moves when
/// a deletion starts), the deletion, the labels (an object changes shard). Not the
/// finalizers: the operator adds its own in the pass that provisions
/// ([`crate::runtime::finalizer`]), and that patch must not trigger another pass; one
/// removed by hand is added back by the next bulk comparison, which finds it missing.
fn reconcile_fingerprint<K: Resource>(obj: &K) -> u64 {
    use std::hash::{Hash, Hasher};
    let meta = obj.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        meta.generation,
        meta.deletion_timestamp.as_ref().map(|t| t.0),
        &meta.labels,
    )
        .hash(&mut h);
    h.finish()
}

/// Runs the controller of `K` on `events` (the kind's watch, after the reflector that
/// fills `cache`).
pub async fn run_on<K, F, Fut>(
    ctx: Arc<Context>,
    kind: &'static str,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    reconcile: F,
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    cache: reflector::Store<K>,
    customise: impl FnOnce(Controller<K>) -> Controller<K>,
) where
    K: crate::runtime::resync::ResyncedKind
        + Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Send
        + Sync
        + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    // The operator's own status writes (and anything else that leaves the spec, the
    // finalizers and the labels alone) trigger nothing. Neither does the first list:
    // at its end (and every relist's) the bulk comparison ([`crate::runtime::resync`])
    // picks the objects that need a reconcile, so a start over an unchanged fleet
    // reconciles nothing.
    let (relisted, relists) = tokio::sync::watch::channel(0u64);
    let mut fingerprints = crate::runtime::changes::Changed::new(reconcile_fingerprint::<K>);
    let changes = events.filter_map(move |event| {
        let passed = match event {
            Ok(event) => {
                if matches!(event, watcher::Event::InitDone) {
                    relisted.send_modify(|relists| *relists += 1);
                }
                let changed = fingerprints.changed(&event).cloned();
                // A deletion is the finalizer's business: it came as an update first.
                match event {
                    watcher::Event::Delete(_) => None,
                    _ => changed.map(Ok),
                }
            }
            Err(err) => Some(Err(err)),
        };
        std::future::ready(passed)
    });
    // Changes of provisioned objects go to the lane of changes ([`crate::runtime::lanes`]); the
    // rest (new objects, triggers from other kinds, retries) to the bulk lane.
    let (mut to_changes, lane_of_changes) = futures::channel::mpsc::channel(LANE_BUFFER);
    let waits_ctx = ctx.clone();
    let bulk = changes.filter_map(move |obj| {
        let obj = match obj {
            // Woken by its Customer instead (see `ResyncedKind::waits_for_customer`).
            Ok(o) if o.waits_for_customer(&waits_ctx) => None,
            Ok(o) if crate::runtime::lanes::is_change_of_provisioned(&o) => {
                match to_changes.try_send(o) {
                    Ok(()) => None,
                    // The lane is full or gone: the bulk lane takes it.
                    Err(err) => Some(Ok(err.into_inner())),
                }
            }
            other => Some(other),
        };
        std::future::ready(obj)
    });
    let locks = Arc::new(crate::runtime::lanes::ObjectLocks::default());
    let shutdown = shutdown.shared();
    ctx.metrics.init_kind(kind);
    {
        let cache = cache.clone();
        ctx.metrics.track_resources(kind, move || {
            let objects = cache.state();
            let ready = objects.iter().filter(|o| o.is_ready()).count();
            (ready as i64, (objects.len() - ready) as i64)
        });
    }
    // The start, each relist and the periodic resync are a bulk comparison
    // ([`crate::runtime::resync`]): only the objects it finds due are reconciled.
    let resync = crate::runtime::resync::due(ctx.clone(), kind, cache.clone(), relists);
    let bulk_lane = customise(Controller::for_stream(bulk, cache.clone()))
        .reconcile_on(resync)
        .with_config(
            Config::default()
                .concurrency(ctx.settings.concurrency)
                .debounce(DEBOUNCE),
        )
        .graceful_shutdown_on(shutdown.clone());
    let changes_lane = Controller::for_stream(lane_of_changes.map(Ok), cache)
        .with_config(
            Config::default()
                .concurrency(crate::runtime::lanes::CHANGES_CONCURRENCY)
                .debounce(DEBOUNCE),
        )
        .graceful_shutdown_on(shutdown);
    futures::join!(
        run_lane(
            bulk_lane,
            ctx.clone(),
            kind,
            reconcile.clone(),
            locks.clone()
        ),
        run_lane(changes_lane, ctx, kind, reconcile, locks)
    );
}

/// Runs one lane's controller: reconciles under the object's lock (see
/// [`crate::runtime::lanes`]), failures retried by [`observed`]'s rules.
async fn run_lane<K, F, Fut>(
    controller: Controller<K>,
    ctx: Arc<Context>,
    kind: &'static str,
    reconcile: F,
    locks: Arc<crate::runtime::lanes::ObjectLocks>,
) where
    K: HasStatus + Resource<Scope = k8s_openapi::NamespaceResourceScope> + Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    controller
        .run(
            move |obj, ctx| {
                let (reconcile, locks) = (reconcile.clone(), locks.clone());
                async move {
                    let key = object_key(obj.as_ref());
                    let _one_lane_at_a_time = locks.lock(&key).await;
                    crate::runtime::failpoint::hang_for(&key).await;
                    observed(obj, ctx, kind, reconcile).await
                }
            },
            move |obj: Arc<K>, err: &Error, ctx: Arc<Context>| {
                if err.is_transient() {
                    Action::requeue(TRANSIENT_RETRY)
                } else {
                    Action::requeue(ctx.backoff.next_delay(&object_key(obj.as_ref())))
                }
            },
            ctx,
        )
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(%err, kind, "reconcile ended with an error");
            }
        })
        .await;
}

/// Changes waiting for the lane of changes before the bulk lane takes more.
const LANE_BUFFER: usize = 256;

/// Times and counts a reconcile; on failure records the error in status (Ready=False
/// with a specific reason) so admins see an outage without reading logs. A panic stays
/// with its object: it becomes [`Error::Panicked`] (`InternalError` in status, a metric,
/// a Warning Event) and the controller goes on with every other object.
async fn observed<K, F, Fut>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    kind: &'static str,
    reconcile: F,
) -> Result<Action, Error>
where
    K: HasStatus + Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    F: Fn(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>>,
{
    // Every log line of this reconcile (the kind's own, the store's) names its object
    // (`object` is its name: a span's own name is `name` in the JSON log).
    let span = tracing::info_span!(
        "reconcile",
        kind,
        namespace = %obj.namespace().unwrap_or_default(),
        object = %obj.name_any(),
        generation = obj.meta().generation.unwrap_or_default(),
    );
    async move {
        let _timer = ctx.metrics.reconcile_started(kind);
        let key = object_key(obj.as_ref());
        let result = AssertUnwindSafe(async {
            crate::runtime::failpoint::panic_for(&key);
            reconcile(obj.clone(), ctx.clone()).await
        })
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| Err(Error::Panicked(panic_message(panic.as_ref()))));
        match &result {
            Ok(_) => ctx.backoff.reset(&key),
            Err(err) if err.is_transient() => {
                ctx.metrics.reconcile_failed(kind, err.metric_label());
                tracing::debug!(error = %err, "reconcile lost a race");
            }
            // A replaced writer stays silent: the object is its successor's to report on.
            Err(err) if err.is_fenced() => {
                tracing::debug!(error = %err, "reconcile refused by the writer fence");
            }
            Err(err) => {
                ctx.metrics.reconcile_failed(kind, err.metric_label());
                tracing::warn!(error = %err, "reconcile failed");
                let api: Api<K> =
                    Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
                let message = format!("{err}; retrying with backoff");
                let ready = Cond::new(types::READY, false, err.condition_reason(), message.clone());
                match status::apply_failure(&api, obj.as_ref(), ready, &[]).await {
                    Ok(true) => {
                        let reference = obj.object_ref(&());
                        ctx.event(
                            &reference,
                            K8sEventType::Warning,
                            err.condition_reason(),
                            "Reconcile",
                            message,
                        )
                        .await;
                    }
                    Ok(false) => {}
                    Err(status_err) => {
                        tracing::debug!(%status_err, "could not record the failure in status")
                    }
                }
            }
        }
        result
    }
    .instrument(span)
    .await
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_objects_lose_only_what_nothing_reads() {
        let mut customer: m3o_crds::Customer = serde_json::from_value(serde_json::json!({
            "apiVersion": "m3o.com/v1alpha1", "kind": "Customer",
            "metadata": {"name": "c", "namespace": "ns",
                "annotations": {LAST_APPLIED: "{\"spec\":{}}", "team": "billing"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"email": "c@example.com"},
        }))
        .expect("a valid Customer");
        strip_unread_metadata(&mut customer);
        assert_eq!(customer.metadata.managed_fields, None);
        let annotations = customer.metadata.annotations.expect("annotations");
        assert_eq!(annotations.keys().collect::<Vec<_>>(), ["team"]);
    }

    #[test]
    fn dependents_hear_of_a_customer_once_it_is_provisioned_and_of_every_deletion() {
        use futures::StreamExt;
        let customer = |ready: bool, deleting: bool| -> m3o_crds::Customer {
            let conditions = if ready {
                serde_json::json!([{"type": "Ready", "status": "True", "reason": "Provisioned",
                    "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}])
            } else {
                serde_json::json!([])
            };
            let mut c: m3o_crds::Customer = serde_json::from_value(serde_json::json!({
                "apiVersion": "m3o.com/v1alpha1", "kind": "Customer",
                "metadata": {"name": "c", "namespace": "ns", "uid": "u1", "generation": 1},
                "spec": {"email": "c@example.com"},
                "status": {"conditions": conditions},
            }))
            .expect("a valid Customer");
            if deleting {
                c.metadata.deletion_timestamp =
                    serde_json::from_value(serde_json::json!("2026-01-02T00:00:00Z")).ok();
            }
            c
        };
        let events = vec![
            watcher::Event::Init,
            watcher::Event::InitDone,
            // Created: its dependents would only wait.
            watcher::Event::Apply(customer(false, false)),
            // Provisioned.
            watcher::Event::Apply(customer(true, false)),
            // Deleted before it was ever provisioned: always passed.
            watcher::Event::Delete(customer(false, false)),
        ];
        let passed: Vec<bool> = futures::executor::block_on(
            customer_changes(futures::stream::iter(events.into_iter().map(Ok)), |c| {
                c.ready_condition().is_none()
            })
            .map(|c| c.expect("no error").is_ready())
            .collect(),
        );
        assert_eq!(passed, [true, false]);
    }

    #[test]
    fn a_change_seen_in_a_relist_is_passed_at_its_end() {
        use futures::{FutureExt, StreamExt};
        let customer = |ready: bool| -> m3o_crds::Customer {
            let status = if ready { "True" } else { "False" };
            serde_json::from_value(serde_json::json!({
                "apiVersion": "m3o.com/v1alpha1", "kind": "Customer",
                "metadata": {"name": "c", "namespace": "ns", "uid": "u1", "generation": 1},
                "spec": {"email": "c@example.com"},
                "status": {"conditions": [{"type": "Ready", "status": status, "reason": "R",
                    "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]},
            }))
            .expect("a valid Customer")
        };
        let (events, rx) = futures::channel::mpsc::unbounded();
        let mut passed = Box::pin(customer_changes(rx.map(Ok), |_| false));
        let send = |e| events.unbounded_send(e).expect("open");
        send(watcher::Event::Init);
        send(watcher::Event::InitApply(customer(false)));
        send(watcher::Event::InitDone);
        // A relist: the cache takes the Ready Customer in at its end.
        send(watcher::Event::Init);
        send(watcher::Event::InitApply(customer(true)));
        // Interrupted and begun again: what it held is kept, and passes once.
        send(watcher::Event::Init);
        send(watcher::Event::InitApply(customer(true)));
        assert!(
            passed.next().now_or_never().is_none(),
            "passed before the relist ended"
        );
        send(watcher::Event::InitDone);
        let after = passed.next().now_or_never().flatten().expect("passed");
        assert!(after.expect("no error").is_ready());
        assert!(passed.next().now_or_never().is_none(), "passed once");
    }

    #[test]
    fn panic_messages_are_read_from_both_payload_kinds() {
        let literal = std::panic::catch_unwind(|| panic!("boom")).expect_err("panics");
        assert_eq!(panic_message(literal.as_ref()), "boom");
        let formatted = std::panic::catch_unwind(|| panic!("boom {}", 42)).expect_err("panics");
        assert_eq!(panic_message(formatted.as_ref()), "boom 42");
    }
}

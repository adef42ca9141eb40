//! What every reconciler shares: clients, settings, metrics, backoff, Events.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use m3o_crds::{Customer, Subscription};

use crate::runtime::referents::ByCustomer;
use sqlx::{PgPool, Postgres, Transaction};

use crate::plans::Plans;
use crate::platform::PlatformConfig;
use crate::report::metrics::Metrics;
use crate::runtime::backoff::Backoff;
use crate::store::fence::{self, Term};

/// Operator settings that reconcilers read (the binary maps flags onto these).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespace to watch, or several separated by commas; `None` watches all.
    pub namespace: Option<String>,
    /// The label selector of this operator's shard; `None`: every object.
    pub shard: Option<crate::runtime::shard::Shard>,
    /// Reconciles running at once, per kind.
    pub concurrency: u16,
    /// How often each kind's objects are compared in bulk with their records (only
    /// those that differ are reconciled, [`crate::runtime::resync`]), and the etcd full resync.
    pub resync_interval: Duration,
    /// First retry delay after a failure; doubles per failure up to `backoff_cap`.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How long to wait before retrying a resource blocked on something else
    /// (a conflicting holder, a missing Customer).
    pub blocked_retry: Duration,
}

impl Settings {
    /// The watched namespaces, from [`Settings::namespace`]; empty: all.
    pub fn watched_namespaces(&self) -> Vec<&str> {
        self.namespace
            .as_deref()
            .map(namespace_list)
            .unwrap_or_default()
    }
}

/// The namespaces of a `--namespace` value: comma-separated, blanks ignored (pure).
pub fn namespace_list(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|ns| !ns.is_empty())
        .collect()
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: None,
            shard: None,
            concurrency: 8,
            resync_interval: Duration::from_secs(300),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(120),
            blocked_retry: Duration::from_secs(30),
        }
    }
}

/// How long a dependent waits for a shared cache to list before it reads the API server.
pub const CACHE_WAIT: Duration = Duration::from_secs(5);

/// True once `store` has listed, waiting at most `wait`.
async fn ready_within<K>(store: &Store<K>, wait: Duration) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    matches!(tokio::time::timeout(wait, listed(store)).await, Ok(true))
}

/// Resolves once `store` has listed: true, or false if its writer is gone first.
/// Asked again every 100 ms: kube's readiness signal is a oneshot that wakes only its
/// latest waiter, and several tasks wait on one store.
pub async fn listed<K>(store: &Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        let ready = tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready());
        match ready.await {
            Ok(Ok(())) => return true,
            Ok(Err(_)) => return false,
            Err(_) => {}
        }
    }
}

/// Shared state of the controllers.
pub struct Context {
    pub client: Client,
    pub db: PgPool,
    pub platform: PlatformConfig,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub backoff: Backoff,
    /// The plan catalog in force (built-in until [`Context::with_plans`]).
    pub plans: Plans,
    /// Kinds whose controller has listed its objects and is watching (for `/readyz`).
    pub watching: Arc<Watching>,
    /// This process's writer term: every write transaction checks it.
    pub term: Arc<Term>,
    /// Usage the rollup learnt, shown in Subscription status ([`crate::usage`]).
    pub usage: Arc<crate::usage::book::UsageBook>,
    /// The cache of the shared Customer watch of the current term ([`crate::runtime::feed`]).
    customers: std::sync::Mutex<Option<Store<Customer>>>,
    /// The Subscription controller's cache and its index by Customer.
    subscriptions: std::sync::Mutex<Option<(Store<Subscription>, ByCustomer<Subscription>)>>,
    reporter: Reporter,
}

/// Which kinds' controllers have completed their initial list and are watching.
#[derive(Default)]
pub struct Watching(std::sync::Mutex<std::collections::BTreeSet<&'static str>>);

impl Watching {
    pub fn mark(&self, kind: &'static str) {
        if let Ok(mut kinds) = self.0.lock() {
            kinds.insert(kind);
        }
    }

    /// True once `kind` is watching.
    pub fn has(&self, kind: &str) -> bool {
        self.0.lock().is_ok_and(|kinds| kinds.contains(kind))
    }

    /// True once every kind in `KINDS` is watching.
    pub fn all(&self) -> bool {
        self.0
            .lock()
            .is_ok_and(|kinds| crate::KINDS.iter().all(|k| kinds.contains(k)))
    }
}

impl Context {
    pub fn new(
        client: Client,
        db: PgPool,
        platform: PlatformConfig,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: "m3o-operator".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let shard = settings.shard.as_ref().map(|s| s.canonical());
        let term = Arc::new(Term::of(fence::fence_name(shard)));
        let divergence =
            crate::platform::divergence::Divergence::counting(metrics.fence_divergence.clone());
        let platform = platform.fenced_by(&term, db.clone(), divergence);
        Self {
            reporter,
            backoff: Backoff::new(settings.backoff_base, settings.backoff_cap),
            client,
            db,
            platform,
            settings,
            metrics,
            plans: Plans::default(),
            watching: Arc::default(),
            term,
            usage: Arc::default(),
            customers: std::sync::Mutex::default(),
            subscriptions: std::sync::Mutex::default(),
        }
    }

    /// Makes every etcd key derived from `customer_id` match Postgres
    /// ([`crate::platform::sync::converge_customer`], under the writer fence); true if
    /// anything was written.
    pub async fn converge_customer(&self, customer_id: uuid::Uuid) -> Result<bool, crate::Error> {
        let lock = self.begin_write().await?;
        let written =
            crate::platform::sync::converge_customer(lock, &self.platform, customer_id).await?;
        self.metrics.config_keys_written(written);
        Ok(written > 0)
    }

    /// Uses `plans` (loaded from `--plans-file`, and replaced when the file changes).
    pub fn with_plans(mut self, plans: Plans) -> Self {
        self.plans = plans;
        self
    }

    /// Dependents read Customers from `store` (the shared watch's cache) from now on.
    pub fn use_customer_cache(&self, store: Store<Customer>) {
        if let Ok(mut customers) = self.customers.lock() {
            *customers = Some(store);
        }
    }

    /// The Subscription controller reads Subscriptions from `store`, found by `index`.
    pub fn use_subscription_cache(
        &self,
        store: Store<Subscription>,
        index: ByCustomer<Subscription>,
    ) {
        if let Ok(mut subscriptions) = self.subscriptions.lock() {
            *subscriptions = Some((store, index));
        }
    }

    /// The Subscriptions referencing Customer `namespace/customer`, from the Subscription
    /// controller's cache (which holds, in watch order, every Subscription created before
    /// the one being reconciled); `None` without that cache.
    pub async fn subscriptions_of(
        &self,
        namespace: &str,
        customer: &str,
    ) -> Option<Vec<Subscription>> {
        let (store, index) = self.subscriptions.lock().ok()?.clone()?;
        if !ready_within(&store, CACHE_WAIT).await {
            return None;
        }
        let found = index
            .referencing(namespace, customer)
            .into_iter()
            .filter_map(|r| store.get(&r))
            .map(|s| Subscription::clone(&s))
            .collect();
        Some(found)
    }

    /// The Customer `namespace/name`: from the shared watch's cache once it has listed
    /// (a dependent is triggered by that watch, so the cache is never older than the
    /// change that woke it), else from the API server. A Customer the cache lacks is
    /// looked up too: it may be outside this shard, which the caller reports. The wait
    /// for the cache is bounded ([`CACHE_WAIT`]): a dependent never holds its lock
    /// stripe on a watch that does not list (it reads the API server instead).
    pub async fn customer(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Customer>, kube::Error> {
        let cache = self.customers.lock().ok().and_then(|c| c.clone());
        if let Some(cache) = cache {
            if !ready_within(&cache, CACHE_WAIT).await {
                tracing::warn!(
                    wait = ?CACHE_WAIT,
                    "the Customer watch has not listed yet; reading the Customer from the API server"
                );
            } else if let Some(customer) = cache.get(&ObjectRef::new(name).within(namespace)) {
                return Ok(Some(Customer::clone(&customer)));
            }
        }
        Api::<Customer>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
    }

    /// The Customer `namespace/name` from the shared watch's cache, without waiting or
    /// I/O; `None` when the cache has not listed or has no such Customer.
    pub fn cached_customer(&self, namespace: &str, name: &str) -> Option<Arc<Customer>> {
        if !self.watching.has(m3o_crds::kinds::CUSTOMER) {
            return None;
        }
        let cache = self.customers.lock().ok().and_then(|c| c.clone())?;
        cache.get(&ObjectRef::new(name).within(namespace))
    }

    /// The record ids of the Customers in the shared watch's cache (this shard's), once
    /// it has listed; `None` before.
    pub async fn customer_ids(&self) -> Option<std::collections::HashSet<uuid::Uuid>> {
        let cache = self.customers.lock().ok().and_then(|c| c.clone())?;
        cache.wait_until_ready().await.ok()?;
        let ids = cache
            .state()
            .iter()
            .filter_map(|c| c.status.as_ref()?.customer_id.as_deref()?.parse().ok())
            .collect();
        Some(ids)
    }

    /// Begins a write transaction behind the writer fence (see [`crate::store::fence`]).
    pub async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        fence::begin_write(&self.db, &self.term).await
    }

    /// Publishes a Kubernetes Event about `object`. Events are informational: a failure
    /// to publish one is logged, never fails a reconcile.
    pub async fn event(
        &self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        // A recorder per Event: kube's Recorder caches every Event it published for six
        // minutes (to count repeats) and scans that cache on each publish, which a bulk
        // apply of thousands of objects turns into memory and quadratic work. The
        // operator publishes an Event only when something changed, so there is nothing
        // to count.
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        if let Err(err) = recorder.publish(&event, object).await {
            tracing::warn!(%err, reason, "could not publish Kubernetes Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};

    #[tokio::test]
    async fn the_wait_for_a_cache_is_bounded() {
        let (store, mut writer) = reflector::store::<Customer>();
        let started = std::time::Instant::now();
        assert!(
            !ready_within(&store, Duration::from_millis(50)).await,
            "never listed"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        assert!(
            ready_within(&store, Duration::from_millis(50)).await,
            "listed"
        );
    }
}

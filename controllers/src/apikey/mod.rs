//! The ApiKey controller: keys issued into Secrets, known elsewhere only by hash. Its
//! files follow the pipeline every kind shares, [`crate::pipeline`]: `plan.rs` decides
//! (orphan check, customer gate, Secret reuse, row writes and events), `build.rs`
//! builds (the Secret, event payloads, status), `reconcile.rs` loads and applies,
//! `cleanup.rs` deletes; `secret.rs` is key material and reading a Secret,
//! `config.rs` its gateway entry, `gateway_sync.rs` the `GatewaySynced` condition.

pub mod build;
pub mod cleanup;
pub mod config;
pub mod gateway_sync;
pub mod plan;
pub mod reconcile;
pub mod secret;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use m3o_crds::{ApiKey, ApiKeyStatus, Customer};

use crate::context::Context;
use crate::error::Error;
use crate::feed::{self, ByCustomer};
use crate::finalizer::reconcile_with_finalizer;
use crate::runner;

pub const KIND: &str = "ApiKey";

crate::status::has_status!(ApiKey, ApiKeyStatus);

async fn reconcile(key: Arc<ApiKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    reconcile_with_finalizer(
        &ctx,
        key,
        |k| reconcile::apply(k, &ctx),
        |k| cleanup::cleanup(k, &ctx),
    )
    .await
}

/// Runs the ApiKey controller until `shutdown` resolves. Besides ApiKeys it watches
/// the Secrets it wrote (metadata only: a deleted or edited Secret is repaired, and no
/// key's plaintext passes through a watch) and Customers, from the shared watch
/// ([`crate::feed`]): a ban, unban or deletion reaches the keys at once.
pub async fn run(
    ctx: Arc<Context>,
    customers: futures::channel::mpsc::Receiver<watcher::Event<Customer>>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let secrets: Api<PartialObjectMeta<Secret>> = runner::scoped_api(&ctx);
    let managed = format!("{}={}", secret::MANAGED_BY.0, secret::MANAGED_BY.1);
    let by_customer = ByCustomer::<ApiKey>::default();
    let observe = {
        let by_customer = by_customer.clone();
        move |event: &watcher::Event<ApiKey>| by_customer.observe(event)
    };
    let sync_ctx = ctx.clone();
    runner::run_with::<ApiKey, _, _>(ctx, KIND, shutdown, reconcile, observe, move |controller| {
        let keys = controller.store();
        let report_changes = gateway_sync::report_changes(sync_ctx, keys);
        let secrets = secret_changes(
            watcher(secrets, watcher::Config::default().labels(&managed)).default_backoff(),
        );
        controller
            .reconcile_on(report_changes)
            .owns_stream(secrets)
            .watches_stream(feed::dependent_changes(customers), move |c: Customer| {
                by_customer.referencing(&c.namespace().unwrap_or_default(), &c.name_any())
            })
    })
    .await;
}

/// The Secret events that may need a repair: a deletion, or a change of a Secret seen
/// before, including those a relist reveals (changed, or gone, while the watch was
/// interrupted). The first sight of a Secret (our own creation, or the first list)
/// triggers nothing: its ApiKey is being reconciled anyway.
fn secret_changes(
    events: impl futures::Stream<
        Item = Result<watcher::Event<PartialObjectMeta<Secret>>, watcher::Error>,
    > + Send
    + 'static,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static
{
    use futures::StreamExt;
    let mut seen = SeenSecrets::default();
    events.flat_map(move |event| {
        let passed = match event {
            Ok(event) => seen.observe(event).into_iter().map(Ok).collect(),
            Err(err) => vec![Err(err)],
        };
        futures::stream::iter(passed)
    })
}

/// What [`secret_changes`] remembers of each Secret: its uid, resourceVersion and
/// owners (enough to trigger its ApiKey), not its data.
#[derive(Default)]
struct SeenSecrets {
    by_uid: std::collections::HashMap<String, PartialObjectMeta<Secret>>,
    relisted: Option<std::collections::HashSet<String>>,
}

impl SeenSecrets {
    /// The Secrets of `event` whose ApiKey must look again.
    fn observe(
        &mut self,
        event: watcher::Event<PartialObjectMeta<Secret>>,
    ) -> Vec<PartialObjectMeta<Secret>> {
        match event {
            watcher::Event::Init => {
                self.relisted = Some(std::collections::HashSet::new());
                Vec::new()
            }
            watcher::Event::InitApply(s) | watcher::Event::Apply(s) => {
                let uid = s.metadata.uid.clone().unwrap_or_default();
                if let Some(relisted) = self.relisted.as_mut() {
                    relisted.insert(uid.clone());
                }
                let kept = trimmed(&s);
                let before = self.by_uid.insert(uid, kept);
                // Changed since seen; the first sight is not a change.
                let changed = before
                    .is_some_and(|b| b.metadata.resource_version != s.metadata.resource_version);
                if changed { vec![s] } else { Vec::new() }
            }
            watcher::Event::Delete(s) => {
                self.by_uid
                    .remove(s.metadata.uid.as_deref().unwrap_or_default());
                vec![s]
            }
            watcher::Event::InitDone => {
                let Some(relisted) = self.relisted.take() else {
                    return Vec::new();
                };
                let gone: Vec<String> = self
                    .by_uid
                    .keys()
                    .filter(|uid| !relisted.contains(*uid))
                    .cloned()
                    .collect();
                gone.iter()
                    .filter_map(|uid| self.by_uid.remove(uid))
                    .collect()
            }
        }
    }
}

/// A Secret's identity and owners only.
fn trimmed(secret: &PartialObjectMeta<Secret>) -> PartialObjectMeta<Secret> {
    let meta = &secret.metadata;
    let mut kept = secret.clone();
    kept.metadata = kube::api::ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        owner_references: meta.owner_references.clone(),
        ..Default::default()
    };
    kept
}

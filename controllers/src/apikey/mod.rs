//! The ApiKey controller: keys issued into Secrets, known elsewhere only by hash. Its
//! files follow the pipeline every kind shares, [`crate::pipeline`]: `plan.rs` decides
//! (admission: the Customer through [`crate::pipeline::dependent`], the orphan check,
//! the grace period; Secret reuse; row writes and events), `build.rs`
//! builds (the Secret, event payloads, status), `reconcile.rs` loads and applies,
//! `cleanup.rs` deletes; `secret.rs` is key material and reading a Secret,
//! `config.rs` its gateway entry, `gateway_sync.rs` the `GatewaySynced` condition.

pub mod build;
pub mod cleanup;
pub mod gateway_sync;
pub mod plan;
pub mod reconcile;
pub mod secret;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use m3o_crds::{ApiKey, ApiKeyStatus, Customer};

use crate::report::error::Error;
use crate::runtime::changes::uid_key;
use crate::runtime::context::Context;
use crate::runtime::feed::{self, ByCustomer};
use crate::runtime::finalizer::reconcile_with_finalizer;
use crate::runtime::relist::Relist;
use crate::runtime::runner;

pub const KIND: &str = m3o_crds::kinds::API_KEY;

crate::report::status::has_status!(ApiKey, ApiKeyStatus);

/// A key's plan also needs its Customer's state, its Secret and the clock: a spec change
/// shows as a generation not yet Ready, the others reach the key through the Customer
/// feed, the Secret watch and the clock-driven expiry. Rows edited by hand are found by
/// their digests.
impl crate::runtime::resync::ResyncedKind for ApiKey {
    const RECORDS: crate::store::resync::RecordTable = crate::store::resync::API_KEYS;
}

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
/// ([`crate::runtime::feed`]): a ban, unban or deletion reaches the keys at once.
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

/// What [`secret_changes`] remembers of each Secret (by uid): enough to tell a change
/// and to trigger its ApiKey, in some 250 bytes, not the Secret's metadata.
#[derive(Default)]
struct SeenSecrets {
    by_uid: std::collections::HashMap<u128, Seen>,
    relist: Relist<u128>,
}

struct Seen {
    resource_version: Option<String>,
    namespace: Option<String>,
    /// kube's triggers need it (`ObjectRef::from_obj` of the Secret).
    name: Option<String>,
    /// The ApiKey that controls the Secret, if any.
    owner: Option<String>,
}

impl Seen {
    fn of(secret: &PartialObjectMeta<Secret>) -> Self {
        let meta = &secret.metadata;
        let owner = meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == KIND && o.controller == Some(true))
            .map(|o| o.name.clone());
        Self {
            resource_version: meta.resource_version.clone(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            owner,
        }
    }

    /// A stand-in for the Secret that triggers its ApiKey (through its owner).
    fn trigger(self) -> PartialObjectMeta<Secret> {
        let owner = self.owner.map(|name| OwnerReference {
            api_version: ApiKey::api_version(&()).into_owned(),
            kind: KIND.to_owned(),
            name,
            controller: Some(true),
            ..OwnerReference::default()
        });
        PartialObjectMeta {
            metadata: kube::api::ObjectMeta {
                namespace: self.namespace,
                name: self.name,
                owner_references: owner.map(|o| vec![o]),
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

impl SeenSecrets {
    /// The Secrets of `event` whose ApiKey must look again.
    fn observe(
        &mut self,
        event: watcher::Event<PartialObjectMeta<Secret>>,
    ) -> Vec<PartialObjectMeta<Secret>> {
        self.relist
            .follow(&event, |s| uid_key(s.metadata.uid.as_deref()));
        match event {
            watcher::Event::Init => Vec::new(),
            watcher::Event::InitApply(s) | watcher::Event::Apply(s) => {
                let uid = uid_key(s.metadata.uid.as_deref());
                let before = self.by_uid.insert(uid, Seen::of(&s));
                // Changed since seen; the first sight is not a change.
                let changed =
                    before.is_some_and(|b| b.resource_version != s.metadata.resource_version);
                if changed { vec![s] } else { Vec::new() }
            }
            watcher::Event::Delete(s) => {
                self.by_uid.remove(&uid_key(s.metadata.uid.as_deref()));
                vec![s]
            }
            watcher::Event::InitDone => {
                let gone = self.relist.lost(self.by_uid.keys().copied(), |uid| *uid);
                gone.iter()
                    .filter_map(|uid| self.by_uid.remove(uid))
                    .map(Seen::trigger)
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(uid: &str, rv: &str, owner: &str) -> PartialObjectMeta<Secret> {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"namespace": "ns", "name": format!("{owner}-api-key"), "uid": uid,
                "resourceVersion": rv, "ownerReferences": [{"apiVersion": "m3o.com/v1alpha1",
                "kind": "ApiKey", "name": owner, "uid": "u", "controller": true}]},
        }))
        .expect("a valid Secret")
    }

    /// The ApiKeys the Secrets trigger, through kube's own `trigger_owners` (what the
    /// controller's `owns_stream` runs).
    fn owners(secrets: Vec<PartialObjectMeta<Secret>>) -> Vec<String> {
        use futures::StreamExt;
        let stream = futures::stream::iter(secrets.into_iter().map(Ok::<_, ()>));
        let requests = kube::runtime::controller::trigger_owners::<ApiKey, _>(stream, (), ());
        futures::executor::block_on(requests.collect::<Vec<_>>())
            .into_iter()
            .filter_map(|r| r.ok().map(|r| r.obj_ref.name))
            .collect()
    }

    #[test]
    fn seen_secrets_trigger_on_change_deletion_and_relist_loss_not_first_sight() {
        let (a, b) = (
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        );
        let mut seen = SeenSecrets::default();
        assert!(
            seen.observe(watcher::Event::Apply(secret(&a, "1", "ka")))
                .is_empty()
        );
        assert!(
            seen.observe(watcher::Event::Apply(secret(&b, "1", "kb")))
                .is_empty()
        );
        assert!(
            seen.observe(watcher::Event::Apply(secret(&a, "1", "ka")))
                .is_empty()
        );
        let changed = seen.observe(watcher::Event::Apply(secret(&a, "2", "ka")));
        assert_eq!(owners(changed), ["ka"]);
        // A relist without b: b was deleted while the watch was down.
        assert!(seen.observe(watcher::Event::Init).is_empty());
        assert!(
            seen.observe(watcher::Event::InitApply(secret(&a, "2", "ka")))
                .is_empty()
        );
        let gone = seen.observe(watcher::Event::InitDone);
        assert_eq!(owners(gone), ["kb"]);
        let deleted = seen.observe(watcher::Event::Delete(secret(&a, "3", "ka")));
        assert_eq!(owners(deleted), ["ka"]);
        assert!(seen.by_uid.is_empty());
    }
}

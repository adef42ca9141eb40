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

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use m3o_crds::{ApiKey, ApiKeyStatus, Customer};

use crate::pipeline::dependent;
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

    fn waits_for_customer(&self, ctx: &Context) -> bool {
        dependent::waits_in_cache(ctx, self)
    }
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
    let managed = format!("{}={}", secret::MANAGED_BY.0, secret::MANAGED_BY.1);
    let secrets = runner::scoped_watch::<PartialObjectMeta<Secret>>(
        &ctx,
        watcher::Config::default().labels(&managed),
    );
    let by_customer = ByCustomer::<ApiKey>::default();
    let observe = {
        let by_customer = by_customer.clone();
        move |event: &watcher::Event<ApiKey>| by_customer.observe(event)
    };
    let sync_ctx = ctx.clone();
    runner::run_with::<ApiKey, _, _>(ctx, KIND, shutdown, reconcile, observe, move |controller| {
        let keys = controller.store();
        let keys_of_secrets = keys.clone();
        let report_changes = gateway_sync::report_changes(sync_ctx, keys);
        let secrets = secret_changes(secrets, keys_of_secrets);
        controller
            .reconcile_on(report_changes)
            .owns_stream(secrets)
            .watches_stream(
                feed::dependent_changes(customers, dependent::being_provisioned),
                move |c: Customer| {
                    by_customer.referencing(&c.namespace().unwrap_or_default(), &c.name_any())
                },
            )
    })
    .await;
}

/// The Secret events that may need a repair: a deletion, or a change of a Secret seen
/// before, including those a relist reveals (changed, or gone, while the watch was
/// interrupted). The first sight of a Secret triggers nothing (our own creation: its
/// ApiKey is being reconciled anyway), except in the first list, which stands for what
/// happened while the operator was down (a start reconciles only what the bulk
/// comparison finds due): a Secret whose data someone else wrote, and, at the list's
/// end, the ApiKeys in `keys` whose Secret was not listed (deleted meanwhile).
fn secret_changes(
    events: impl futures::Stream<
        Item = Result<watcher::Event<PartialObjectMeta<Secret>>, watcher::Error>,
    > + Send
    + 'static,
    keys: kube::runtime::reflector::Store<ApiKey>,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static
{
    use futures::StreamExt;
    let mut seen = SeenSecrets::default();
    events
        .map(move |event| match event {
            Ok(event) => {
                let passed: Vec<_> = seen.observe(event).into_iter().map(Ok).collect();
                (passed, seen.first_list_ended())
            }
            Err(err) => (vec![Err(err)], None),
        })
        .then(move |(mut passed, first_list)| {
            let keys = keys.clone();
            async move {
                // The ApiKeys' own first list may still be under way.
                if let Some(listed) = first_list
                    && crate::runtime::context::listed(&keys).await
                {
                    let keys = keys.state();
                    passed.extend(keys_without_secret(&keys, &listed).map(Ok));
                }
                futures::stream::iter(passed)
            }
        })
        .flatten()
}

/// Stand-ins (see [`Seen::trigger`]) for the `keys` whose Secret is not among `listed`
/// (namespace, name).
fn keys_without_secret<'a>(
    keys: &'a [Arc<ApiKey>],
    listed: &'a HashSet<(String, String)>,
) -> impl Iterator<Item = PartialObjectMeta<Secret>> + 'a {
    keys.iter()
        .filter(|k| k.metadata.deletion_timestamp.is_none())
        .filter(move |k| {
            let place = (k.namespace().unwrap_or_default(), secret::secret_name(k));
            !listed.contains(&place)
        })
        .map(|k| Seen {
            resource_version: None,
            namespace: k.namespace(),
            name: Some(secret::secret_name(k)),
            owner: Some(k.name_any()),
        })
        .map(Seen::trigger)
}

/// Whether someone other than the operator wrote a Secret's data after it was created:
/// a manager of its `data` fields (`metadata.managedFields`) that is not ours, at a
/// later second than the creation (a Secret created by an operator of before the field
/// manager was set on creation is not taken for edited; an edit within the creation's
/// second is, by this, missed until the next change of its Secret or key).
fn data_written_by_others(secret: &PartialObjectMeta<Secret>) -> bool {
    let created = secret.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let managed = secret.metadata.managed_fields.iter().flatten();
    managed
        .filter(|m| m.manager.as_deref() != Some(crate::report::status::FIELD_MANAGER))
        .filter(|m| m.time.as_ref().map(|t| t.0) > created)
        .any(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.get("f:data").is_some())
        })
}

/// What [`secret_changes`] remembers of each Secret (by uid): enough to tell a change
/// and to trigger its ApiKey, in some 250 bytes, not the Secret's metadata.
#[derive(Default)]
struct SeenSecrets {
    by_uid: std::collections::HashMap<u128, Seen>,
    relist: Relist<u128>,
    /// The first list's end has been seen.
    listed_once: bool,
    /// At the first list's end, until taken: the Secrets it listed (namespace, name).
    first_list: Option<HashSet<(String, String)>>,
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
    /// The Secrets the first list listed, once, at its end.
    fn first_list_ended(&mut self) -> Option<HashSet<(String, String)>> {
        self.first_list.take()
    }

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
                // Changed since seen; the first sight is not a change, unless the first
                // list shows someone else wrote the data while the operator was down.
                let changed = match before {
                    Some(b) => b.resource_version != s.metadata.resource_version,
                    None => !self.listed_once && data_written_by_others(&s),
                };
                if changed { vec![s] } else { Vec::new() }
            }
            watcher::Event::Delete(s) => {
                self.by_uid.remove(&uid_key(s.metadata.uid.as_deref()));
                vec![s]
            }
            watcher::Event::InitDone => {
                if !self.listed_once {
                    self.listed_once = true;
                    let listed = self.by_uid.values();
                    let listed =
                        listed.filter_map(|s| Some((s.namespace.clone()?, s.name.clone()?)));
                    self.first_list = Some(listed.collect());
                }
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

    fn with_managers(
        mut s: PartialObjectMeta<Secret>,
        managers: serde_json::Value,
    ) -> PartialObjectMeta<Secret> {
        s.metadata.creation_timestamp =
            serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).expect("time");
        s.metadata.managed_fields = serde_json::from_value(managers).expect("managed fields");
        s
    }

    #[test]
    fn the_first_list_reports_secrets_edited_by_others_and_what_it_listed() {
        let data = serde_json::json!({"f:data": {"f:apiKey": {}}});
        let ours = with_managers(
            secret("u1", "1", "ours"),
            serde_json::json!([
                {"manager": "m3o-operator", "operation": "Update", "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": data},
            ]),
        );
        let legacy = with_managers(
            secret("u2", "1", "legacy"),
            serde_json::json!([
                {"manager": "unknown", "operation": "Update", "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": data},
            ]),
        );
        let edited = with_managers(
            secret("u3", "1", "edited"),
            serde_json::json!([
                {"manager": "m3o-operator", "operation": "Update", "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": data},
                {"manager": "kubectl-edit", "operation": "Update", "time": "2026-01-02T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": data},
            ]),
        );
        let mut seen = SeenSecrets::default();
        seen.observe(watcher::Event::Init);
        let mut passed = Vec::new();
        for s in [ours, legacy, edited.clone()] {
            passed.extend(seen.observe(watcher::Event::InitApply(s)));
        }
        assert_eq!(owners(passed), ["edited"]);
        assert_eq!(seen.first_list_ended(), None, "not before the list's end");
        assert!(seen.observe(watcher::Event::InitDone).is_empty());
        let listed = seen.first_list_ended().expect("the first list");
        assert_eq!(listed.len(), 3);
        assert_eq!(seen.first_list_ended(), None, "once");
        // After the first list, the first sight of a Secret is our own creation.
        let later = with_managers(
            secret("u4", "1", "later"),
            serde_json::json!([
                {"manager": "kubectl-edit", "operation": "Update", "time": "2026-01-02T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": data},
            ]),
        );
        assert!(seen.observe(watcher::Event::Apply(later)).is_empty());
        // The keys whose Secret the first list did not list.
        let key = |name: &str| -> Arc<ApiKey> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "m3o.com/v1alpha1", "kind": "ApiKey",
                    "metadata": {"name": name, "namespace": "ns"},
                    "spec": {"customerRef": {"name": "c"}, "description": "d", "scopes": ["*"]},
                }))
                .expect("a valid ApiKey"),
            )
        };
        let keys = [key("ours"), key("gone")];
        let missing: Vec<_> = keys_without_secret(&keys, &listed).collect();
        assert_eq!(owners(missing), ["gone"]);
    }
}

//! The Subscription controller: a customer's plan and quota. Its files follow the
//! pipeline every kind shares, [`crate::pipeline`]: `plan.rs` decides (effective quota,
//! customer gate, the slot rule, row write and events), `build.rs` builds (event
//! payloads, status), `reconcile.rs` loads and applies, `cleanup.rs` deletes;
//! `config.rs` is its etcd entry.
//!
//! Semantics chosen here:
//! - Events: `SubscriptionChanged{tier}` when a subscription comes into force and when
//!   its plan changes; never on a repeat, and not for quota-only changes (a quota
//!   override or a catalog edit): the event carries only the tier, and consumers that
//!   need quotas read etcd. `SubscriptionCancelled{tier}` on deletion with policy
//!   `Delete`; `Orphan` leaves the row, the quota key and the customer's plan in place.
//! - One per customer, by one rule ([`plan::slot_decision`]): the Subscription whose
//!   record is in force keeps it while it lives; when none is in force (or its
//!   Subscription is gone, deleted with `Orphan`), the oldest live Subscription
//!   (creationTimestamp, then name) takes it. The others report `Conflict` naming the
//!   holder. The decision is made inside the transaction that locks the customer's
//!   record, and a partial unique index settles two first inserts racing.
//! - What keeps it converging without waiting for a resync: changes of a Customer
//!   reconcile the Subscriptions referencing it, changes of a Subscription (notably its
//!   deletion) reconcile its siblings, and a plan catalog change reconciles them all.

pub mod build;
pub mod cleanup;
pub mod config;
pub mod plan;
pub mod reconcile;

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};
use m3o_crds::{Customer, Subscription, SubscriptionStatus};

use crate::context::Context;
use crate::error::Error;
use crate::finalizer::reconcile_with_finalizer;
use crate::runner;

pub const KIND: &str = "Subscription";

crate::status::has_status!(Subscription, SubscriptionStatus);

async fn reconcile(sub: Arc<Subscription>, ctx: Arc<Context>) -> Result<Action, Error> {
    reconcile_with_finalizer(
        &ctx,
        sub,
        |s| reconcile::apply(s, &ctx),
        |s| cleanup::cleanup(s, &ctx),
    )
    .await
}

/// Runs the Subscription controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let customers: Api<Customer> = runner::scoped_api(&ctx);
    let subscriptions: Api<Subscription> = runner::scoped_api(&ctx);
    let catalog_changes = ctx.plans.changes();
    let watch_config = runner::watch_config(&ctx);
    runner::run_with(ctx, KIND, shutdown, reconcile, move |controller| {
        let store = controller.store();
        let by_customer = store.clone();
        controller
            .watches_stream(
                runner::customer_changes(customers, watch_config.clone()),
                move |c: Customer| {
                    let namespace = c.namespace().unwrap_or_default();
                    referencing(&by_customer, &namespace, &c.name_any(), None)
                },
            )
            .watches(subscriptions, watch_config, move |s: Subscription| {
                let namespace = s.namespace().unwrap_or_default();
                let name = s.name_any();
                referencing(&store, &namespace, &s.spec.customer_ref.name, Some(&name))
            })
            .reconcile_all_on(catalog_changes)
    })
    .await;
}

/// The Subscriptions (but `except`) that reference Customer `namespace/customer`.
fn referencing(
    store: &Store<Subscription>,
    namespace: &str,
    customer: &str,
    except: Option<&str>,
) -> Vec<ObjectRef<Subscription>> {
    store
        .state()
        .iter()
        .filter(|s| s.namespace().as_deref() == Some(namespace))
        .filter(|s| s.spec.customer_ref.name == customer)
        .filter(|s| except != Some(s.name_any().as_str()))
        .map(|s| ObjectRef::from_obj(s.as_ref()))
        .collect()
}

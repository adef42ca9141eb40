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
pub mod plan;
pub mod reconcile;

use std::sync::Arc;

use futures::channel::mpsc;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use m3o_crds::{Customer, Subscription, SubscriptionStatus};

use crate::pipeline::dependent;
use crate::report::error::Error;
use crate::runtime::changes::{Changed, spec_fingerprint};
use crate::runtime::context::Context;
use crate::runtime::feed::{self, ByCustomer};
use crate::runtime::finalizer::reconcile_with_finalizer;
use crate::runtime::runner;

pub const KIND: &str = m3o_crds::kinds::SUBSCRIPTION;

crate::report::status::has_status!(Subscription, SubscriptionStatus);

impl crate::runtime::resync::ResyncedKind for Subscription {
    const RECORDS: crate::store::resync::RecordTable = crate::store::resync::SUBSCRIPTIONS;

    /// The record from the resource, the catalog in force and the record's customer:
    /// a catalog edited while the operator was down shows here.
    fn planned_digest(
        &self,
        catalog: &crate::plans::Catalog,
        records: &crate::store::resync::LiveRecords,
    ) -> Option<String> {
        use crate::pipeline::row_plan::Digested;
        let quota = plan::effective_quota(catalog, &self.spec).ok()?;
        Some(plan::desired_record(self, records.customer_id?, quota).digest())
    }

    fn waits_for_customer(&self, ctx: &Context) -> bool {
        dependent::waits_in_cache(ctx, self)
    }
}

async fn reconcile(sub: Arc<Subscription>, ctx: Arc<Context>) -> Result<Action, Error> {
    reconcile_with_finalizer(
        &ctx,
        sub,
        |s| reconcile::apply(s, &ctx),
        |s| cleanup::cleanup(s, &ctx),
    )
    .await
}

/// Runs the Subscription controller until `shutdown` resolves; `customers` are the
/// shared Customer watch's events ([`crate::runtime::feed`]).
pub async fn run(
    ctx: Arc<Context>,
    customers: mpsc::Receiver<watcher::Event<Customer>>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let catalog_changes = ctx.plans.changes();
    let by_customer = ByCustomer::<Subscription>::default();
    let (siblings_tx, siblings) = mpsc::unbounded();
    // The usage rollup asks for a status write through this (see `crate::usage::book`).
    let (usage_tx, usage_changes) = mpsc::unbounded();
    ctx.usage.set_trigger(usage_tx);
    let observe = {
        let by_customer = by_customer.clone();
        let mut changes = Changed::new(spec_fingerprint::<Subscription>);
        move |event: &watcher::Event<Subscription>| {
            by_customer.observe(event);
            // A Subscription that changes its spec, starts or ends its deletion frees or
            // takes the slot its siblings wait for: they look again.
            if let Some(s) = changes.changed(event) {
                let namespace = s.namespace().unwrap_or_default();
                let name = s.name_any();
                for sibling in by_customer.referencing(&namespace, &s.spec.customer_ref.name) {
                    if sibling.name != name {
                        let _ = siblings_tx.unbounded_send(sibling);
                    }
                }
            }
        }
    };
    let cache_ctx = ctx.clone();
    runner::run_with(ctx, KIND, shutdown, reconcile, observe, move |controller| {
        // Siblings for the slot decision come from this cache (no namespace list).
        cache_ctx.use_subscription_cache(controller.store(), by_customer.clone());
        controller
            .watches_stream(
                feed::dependent_changes(customers, dependent::being_provisioned),
                move |c: Customer| {
                    by_customer.referencing(&c.namespace().unwrap_or_default(), &c.name_any())
                },
            )
            .reconcile_on(siblings)
            .reconcile_on(usage_changes)
            .reconcile_all_on(catalog_changes)
    })
    .await;
}

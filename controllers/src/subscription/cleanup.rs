//! Deleting a Subscription: with `Delete`, cancel the row (and announce it in the same
//! transaction), then converge the customer's keys (the quota key goes, the plan empties);
//! with `Orphan`, leave both in place. Neither needs the Customer object nor a live
//! customer row, so Customer and Subscription can be deleted together in any order.
//! Every step tolerates having run before, so a crash anywhere just repeats it.

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use m3o_crds::Subscription;
use m3o_events::customers::EventType;
use uuid::Uuid;

use super::{build, plan};
use crate::pipeline::outbox_events;
use crate::report::error::{AtStep, Error, Step};
use crate::report::lifecycle;
use crate::runtime::context::Context;
use crate::store::customers::{self, CustomerRow};
use crate::store::subscriptions::{self, SubscriptionRow};
use sqlx::PgConnection;

pub async fn cleanup(sub: Arc<Subscription>, ctx: &Context) -> Result<Action, Error> {
    let namespace = sub.namespace().unwrap_or_default();
    let name = sub.name_any();
    let api: Api<Subscription> = Api::namespaced(ctx.client.clone(), &namespace);
    let policy = sub.spec.deletion_policy;
    if !lifecycle::begin_cleanup(
        ctx,
        &api,
        &sub,
        policy,
        "the subscription record and its quota in etcd",
    )
    .await?
    {
        return Ok(Action::await_change());
    }

    let cancelled = cancel_own(ctx, &namespace, &name)
        .await
        .at(Step::Database)?;

    // The keys follow whether this pass or an earlier one (that crashed) cancelled the row.
    if let Some(customer_id) = cancelled.or_else(|| plan::known_customer_id(&sub)) {
        lifecycle::converge_customers(ctx, [customer_id]).await?;
        tracing::info!(customer = %customer_id, "subscription cancelled");
    }
    Ok(Action::await_change())
}

/// Cancels the resource's row in force, with its event, in one transaction. Returns
/// its customer (none when no row is in force).
pub(crate) async fn cancel_own(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<Uuid>, Error> {
    let mut tx = ctx.begin_write().await?;
    let cancelled = match subscriptions::lock_live_by_k8s_ref(&mut tx, namespace, name).await? {
        Some(row) => {
            // The customer row may be deleted already: its last state still names it.
            // Read, not locked: the customer's own cleanup locks customer then
            // subscription, and the opposite order here could deadlock with it.
            let customer = customers::by_id(&mut *tx, row.customer_id).await?;
            cancel(&mut tx, &row, customer.as_ref()).await?;
            Some(row.customer_id)
        }
        None => None,
    };
    tx.commit().await?;
    Ok(cancelled)
}

/// Cancels a subscription record in force and announces it (SubscriptionCancelled), in
/// the caller's transaction: on the Subscription's deletion, and on its Customer's.
pub async fn cancel(
    tx: &mut PgConnection,
    row: &SubscriptionRow,
    customer: Option<&CustomerRow>,
) -> Result<(), Error> {
    let row = subscriptions::mark_cancelled(tx, row.id).await?;
    let payload = build::customer_payload(row.customer_id, customer);
    let event = build::event(payload, EventType::SubscriptionCancelled, &row.plan);
    outbox_events::enqueue(tx, [(row.customer_id.to_string(), event)]).await
}

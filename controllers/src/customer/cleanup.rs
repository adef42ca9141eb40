//! Deleting a Customer: with `Delete`, cancel its subscription in force and mark the
//! row deleted (announcing both in the same transaction), then remove its etcd keys;
//! with `Orphan`, leave everything in place.
//! Every step tolerates having run before, so a crash anywhere just repeats it.

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use m3o_crds::Customer;
use m3o_events::customers::EventType;
use uuid::Uuid;

use super::{build, plan};
use crate::pipeline::outbox_events;
use crate::report::error::{AtStep, Error, Step};
use crate::report::lifecycle;
use crate::runtime::context::Context;
use crate::store::{customers, subscriptions};
use crate::subscription;

pub async fn cleanup(customer: Arc<Customer>, ctx: &Context) -> Result<Action, Error> {
    let namespace = customer.namespace().unwrap_or_default();
    let name = customer.name_any();
    let api: Api<Customer> = Api::namespaced(ctx.client.clone(), &namespace);
    let policy = customer.spec.deletion_policy;
    if !lifecycle::begin_cleanup(
        ctx,
        &api,
        &customer,
        policy,
        "the customer record and its etcd config",
    )
    .await?
    {
        return Ok(Action::await_change());
    }

    let deleted = mark_deleted(ctx, &namespace, &name)
        .await
        .at(Step::Database)?;

    // The key goes whether this pass or an earlier one (that crashed) marked the row.
    let id = match deleted.or_else(|| plan::known_id(&customer)) {
        Some(id) => Some(id),
        // Status lost and the row already marked by a pass that crashed: find it by name.
        None => customers::latest_by_k8s_ref(&ctx.db, &namespace, &name)
            .await
            .at(Step::Load("the latest customer record"))?
            .map(|row| row.id),
    };
    if let Some(id) = id {
        // The row is no longer live, so its key and its dependents' resolve to "absent".
        lifecycle::converge_customers(ctx, [id]).await?;
        tracing::info!(customer = %id, "customer deleted");
    }
    Ok(Action::await_change())
}

/// Marks the live row deleted, cancelling its subscription in force, with both events,
/// in one transaction. Returns its id (none when no row is live).
pub(crate) async fn mark_deleted(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<Uuid>, Error> {
    let mut tx = ctx.begin_write().await?;
    let deleted = match customers::lock_live_by_k8s_ref(&mut tx, namespace, name).await? {
        Some(row) => {
            // Its subscription ends with it (the quota key goes with the convergence
            // below); keys are revoked by their own controller, which sees the
            // customer gone.
            if let Some(in_force) = subscriptions::lock_live_by_customer(&mut tx, row.id).await? {
                subscription::cleanup::cancel(&mut tx, &in_force, Some(&row)).await?;
            }
            let row = customers::mark_deleted(&mut tx, row.id).await?;
            outbox_events::enqueue(&mut tx, [build::event(&row, EventType::Deleted)]).await?;
            Some(row.id)
        }
        None => None,
    };
    tx.commit().await?;
    Ok(deleted)
}

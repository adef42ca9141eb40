//! Status-and-Event steps every kind ends a reconcile with, written once: reporting a
//! provisioned object, an object blocked on something only an admin can fix, and the
//! start of a deletion.

use kube::Api;
use std::collections::BTreeSet;

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use m3o_crds::DeletionPolicy;
use uuid::Uuid;

use crate::report::blocker::Blocker;
use crate::report::error::{AtStep, Error, Step};
use crate::report::status::{self, Cond, HasStatus, reasons, types};
use crate::runtime::context::Context;
use crate::store::orphans;

/// Writes the status of a provisioned object; the first time it is Ready, also a
/// Normal `Provisioned` Event with `note`. The object is looked at again on a change,
/// or when the bulk resync ([`crate::runtime::resync`]) finds it due.
pub async fn report_provisioned<K: HasStatus>(
    ctx: &Context,
    api: &Api<K>,
    obj: &K,
    new: &K::Status,
    note: String,
) -> Result<Action, Error> {
    let was_ready = obj.is_ready();
    status::apply(api, obj, new).await.at(Step::Status)?;
    if !was_ready {
        ctx.event(
            &obj.object_ref(&()),
            EventType::Normal,
            reasons::PROVISIONED,
            "Provision",
            note,
        )
        .await;
    }
    // Looked at again on a change, or when the bulk resync finds it due.
    Ok(Action::await_change())
}

/// Writes the status of an object that waits on something outside it (a conflicting
/// holder, a missing Customer, an unknown plan) and retries later, since the blocker
/// may go away without any change to this object. Logs and publishes a Warning Event
/// only when the status changed, so a long wait is not a flood.
pub async fn report_blocked<K: HasStatus>(
    ctx: &Context,
    api: &Api<K>,
    obj: &K,
    blocker: Blocker,
    status_of: impl FnOnce(&Blocker) -> K::Status,
) -> Result<Action, Error> {
    let new = status_of(&blocker);
    let Blocker { reason, message } = blocker;
    if status::apply(api, obj, &new).await.at(Step::Status)? {
        tracing::warn!(reason, %message, "blocked");
        ctx.event(
            &obj.object_ref(&()),
            EventType::Warning,
            reason,
            "Provision",
            message,
        )
        .await;
    }
    Ok(Action::requeue(ctx.settings.blocked_retry))
}

/// Converges the platform config of each customer once: the step after a transaction
/// that changed their records (the kinds' records and their dependents' resolve there).
pub async fn converge_customers(
    ctx: &Context,
    customer_ids: impl IntoIterator<Item = Uuid>,
) -> Result<(), Error> {
    let ids: BTreeSet<Uuid> = customer_ids.into_iter().collect();
    for id in ids {
        ctx.converge_customer(id).await.at(Step::ConfigStore)?;
    }
    Ok(())
}

/// Marks an object `Deleting`. Returns false for `Orphan` (after saying what is kept):
/// the caller then leaves its external records alone.
pub async fn begin_cleanup<K: HasStatus>(
    ctx: &Context,
    api: &Api<K>,
    obj: &K,
    policy: DeletionPolicy,
    kept: &str,
) -> Result<bool, Error> {
    let deleting = Cond::new(
        types::READY,
        false,
        reasons::DELETING,
        format!("cleaning up (deletionPolicy {policy:?})"),
    );
    status::apply_failure(api, obj, deleting, &[])
        .await
        .at(Step::Status)?;
    if policy == DeletionPolicy::Orphan {
        mark_orphaned(ctx, obj).await?;
        let note = format!("deletionPolicy Orphan: {kept} are kept");
        ctx.event(
            &obj.object_ref(&()),
            EventType::Normal,
            "Orphaned",
            "Delete",
            note,
        )
        .await;
        return Ok(false);
    }
    Ok(true)
}

/// Marks the records of `obj`, deleted under deletionPolicy Orphan, as kept on purpose:
/// the recovery pass ([`crate::runtime::orphans`]) retires only records of resources
/// gone under Delete.
async fn mark_orphaned<K: HasStatus>(ctx: &Context, obj: &K) -> Result<(), Error> {
    use kube::ResourceExt;
    let Some(table) = orphans::Table::of_kind(&K::kind(&())) else {
        return Ok(());
    };
    let (ns, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
    let mut tx = ctx.begin_write().await.at(Step::Database)?;
    orphans::mark_orphaned(&mut tx, table, &ns, &name)
        .await
        .at(Step::Database)?;
    tx.commit().await.at(Step::Database)?;
    Ok(())
}

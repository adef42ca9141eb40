//! Applying a Subscription: load and validate, one Postgres transaction (row + outbox),
//! then etcd, then status.

use std::sync::Arc;

use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use m3o_crds::{Customer, Subscription};

use super::{build, plan};
use crate::pipeline::dependent::{self, Gate};
use crate::pipeline::outbox_events;
use crate::pipeline::row_plan::RowWrite;
use crate::report::blocker::Blocker;
use crate::report::error::{AtStep, Error, Step};
use crate::report::lifecycle;
use crate::runtime::context::Context;
use crate::store::customers::{self, CustomerRow};
use crate::store::subscriptions::{self, SubscriptionRecord, SubscriptionRow};
use crate::store::unique_violation;
use crate::usage::plan::{self as usage_plan, UsageView};
use m3o_platform_contract::quota_key;
use plan::RecordHolder;

/// Converges Postgres, etcd and status on the Subscription's spec.
pub async fn apply(sub: Arc<Subscription>, ctx: &Context) -> Result<Action, Error> {
    let namespace = sub.namespace().unwrap_or_default();
    let api: Api<Subscription> = Api::namespaced(ctx.client.clone(), &namespace);
    let catalog = ctx.plans.current();
    let quota = match plan::effective_quota(&catalog, &sub.spec) {
        Ok(quota) => quota,
        Err(blocker) => return blocked(&api, &sub, ctx, blocker).await,
    };
    let name = &sub.spec.customer_ref.name;
    let customers_listed = ctx.watching.has(m3o_crds::kinds::CUSTOMER);
    let (customer, row) = load_customer(ctx, &namespace, name).await?;
    let shard = ctx.settings.shard.as_ref();
    let customer_row = match plan::customer_use(shard, customer.as_ref(), row.as_ref()) {
        Gate::Use(row) => row.clone(),
        Gate::Wait => {
            return Ok(dependent::wait(
                customers_listed,
                ctx.settings.blocked_retry,
            ));
        }
        Gate::Blocked(blocker) => return blocked(&api, &sub, ctx, blocker).await,
        Gate::Refused(refusal) => {
            let blocker = plan::customer_refusal(name, refusal);
            return blocked(&api, &sub, ctx, blocker).await;
        }
    };
    let desired = plan::desired_record(&sub, customer_row.id, quota);
    let synced = sync_record(ctx, &sub, &desired, &customer_row)
        .await
        .at(Step::Database)?;
    let (row, previous_customer) = match synced {
        Ok(synced) => synced,
        Err(blocker) => return blocked(&api, &sub, ctx, blocker).await,
    };

    // A record that moved to a re-created customer: the old customer's keys follow.
    let customers = [Some(row.customer_id), previous_customer];
    lifecycle::converge_customers(ctx, customers.into_iter().flatten()).await?;

    let key = ctx.platform.key(&quota_key(row.customer_id));
    let usage = match ctx.usage.shown(row.customer_id) {
        Some(view) => Some(UsageView {
            monthly: row.monthly_requests,
            ..view
        }),
        None => usage_without_rollup(ctx, &sub, &row).await?,
    };
    let status = crate::usage::plan::with_usage(
        build::provisioned_status(&sub, &row, &key),
        usage.as_ref(),
        sub.metadata.generation,
    );
    let note = build::provisioned_note(&row, &key);
    lifecycle::report_provisioned(ctx, &api, &sub, &status, note).await
}

/// The usage status must show when the rollup has nothing for the customer
/// ([`usage_plan::fallback`]): read from `usage_daily` when status shows another period
/// or quota, else none (status keeps what it shows).
async fn usage_without_rollup(
    ctx: &Context,
    sub: &Subscription,
    row: &SubscriptionRow,
) -> Result<Option<UsageView>, Error> {
    let shown = sub.status.as_ref().and_then(|s| s.usage.as_ref());
    let period = usage_plan::period_of(crate::usage::rollup::now().date_naive());
    match usage_plan::fallback(shown, &period, row.monthly_requests) {
        usage_plan::Fallback::Keep => Ok(None),
        usage_plan::Fallback::Read { period, monthly } => {
            let requests =
                crate::usage::rollup::requests_in_period(&ctx.db, row.customer_id, &period)
                    .await
                    .at(Step::Database)?;
            Ok(Some(UsageView {
                period,
                requests,
                monthly,
            }))
        }
    }
}

/// The Customer `namespace/name` and, when it exists, its live row.
async fn load_customer(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<(Option<Customer>, Option<CustomerRow>), Error> {
    let customer = ctx
        .customer(namespace, name)
        .await
        .at(Step::Load("the Customer"))?;
    // Waiting for the Customer, or blocked by its shard: decided without the record.
    let early = dependent::before_records(ctx.settings.shard.as_ref(), customer.as_ref());
    let row = match customer {
        Some(_) if early.is_none() => customers::live_by_k8s_ref(&ctx.db, namespace, name)
            .await
            .at(Step::Load("the customer record"))?,
        _ => None,
    };
    Ok((customer, row))
}

/// The database step: finds the row (by namespace/name, else a record of this customer
/// left by a Subscription that no longer exists), writes what the plan says and its
/// events in one transaction. Returns the row and the customer it pointed at before.
async fn sync_record(
    ctx: &Context,
    sub: &Subscription,
    desired: &SubscriptionRecord,
    customer: &CustomerRow,
) -> Result<Result<(SubscriptionRow, Option<uuid::Uuid>), Blocker>, Error> {
    let mut tx = ctx.begin_write().await?;
    // The customer stays live until this commits (its deletion waits), or the record
    // is not written: no subscription in force for a deleted customer.
    if customers::lock_live_shared(&mut tx, customer.id)
        .await?
        .is_none()
    {
        return Ok(Err(plan::customer_gone(&sub.spec.customer_ref.name)));
    }
    let k8s = &desired.k8s;
    let own = subscriptions::lock_live_by_k8s_ref(&mut tx, &k8s.namespace, &k8s.name).await?;
    let existing = match own {
        own if plan::keeps_own_record(own.as_ref(), customer.id) => own,
        own => {
            // The customer's record in force (locked), and who holds it: the slot
            // decision is made here, under the lock, by the one rule in `plan`.
            let in_force = subscriptions::lock_live_by_customer(&mut tx, customer.id).await?;
            let holder = match &in_force {
                None => RecordHolder::Nobody,
                Some(row) => holder_of(ctx, row).await?,
            };
            let siblings = match holder {
                RecordHolder::Nobody | RecordHolder::Gone => siblings(ctx, sub).await?,
                _ => Vec::new(),
            };
            if let Err(blocker) = plan::slot_decision(sub, &siblings, &holder) {
                return Ok(Err(blocker));
            }
            if own.is_none()
                && let Some(row) = &in_force
            {
                tracing::info!(subscription = %row.id, from = %row.k8s_name, "adopting an orphaned subscription record");
            }
            own.or(in_force)
        }
    };
    let previous_customer = existing.as_ref().map(|r| r.customer_id);
    let row_plan = plan::plan_row(existing.as_ref(), desired);
    let written = match row_plan.write {
        RowWrite::Keep(row) => return Ok(Ok((row.clone(), previous_customer))),
        RowWrite::Insert(id) => subscriptions::insert(&mut tx, id, desired).await,
        RowWrite::Update(row) => subscriptions::update(&mut tx, row.id, desired).await,
    };
    let row = match written {
        Ok(row) => row,
        Err(err)
            if unique_violation(&err).as_deref() == Some(subscriptions::ACTIVE_CUSTOMER_INDEX) =>
        {
            // Another reconcile put a subscription in force for this customer meanwhile.
            return Err(Error::Transient(format!(
                "customer {} got a subscription concurrently",
                customer.id
            )));
        }
        Err(err) => return Err(err.into()),
    };
    let events: Vec<_> = (row_plan.events.iter())
        .map(|t| {
            let payload = build::customer_payload(customer.id, Some(customer));
            (
                customer.id.to_string(),
                build::event(payload, *t, &row.plan),
            )
        })
        .collect();
    outbox_events::enqueue(&mut tx, events).await?;
    tx.commit().await?;
    tracing::info!(subscription = %row.id, customer = %row.customer_id, plan = %row.plan,
        events = ?row_plan.events, "subscription record written");
    Ok(Ok((row, previous_customer)))
}

/// Who holds a record in force that is not this Subscription's own.
async fn holder_of(ctx: &Context, row: &SubscriptionRow) -> Result<RecordHolder, Error> {
    let api: Api<Subscription> = Api::namespaced(ctx.client.clone(), &row.k8s_namespace);
    let holder = api
        .get_opt(&row.k8s_name)
        .await
        .at(Step::Load("the Subscription holding the record"))?
        .filter(|s| s.uid().as_deref() == Some(row.k8s_uid.as_str()));
    Ok(match holder {
        None => RecordHolder::Gone,
        Some(s) if s.metadata.deletion_timestamp.is_some() => RecordHolder::Deleting(s.name_any()),
        Some(s) => RecordHolder::Live(s.name_any()),
    })
}

/// The Subscriptions of the same customer: from the Subscription cache through its
/// customerRef index (it holds, in watch order, every Subscription created before this
/// one; a sibling deleted a moment ago may still show, and its Delete event makes the
/// others look again). Without the cache, a list field-selected on
/// `spec.customerRef.name` (the API server scans the namespace for it).
async fn siblings(ctx: &Context, sub: &Subscription) -> Result<Vec<Subscription>, Error> {
    let namespace = sub.namespace().unwrap_or_default();
    let customer = &sub.spec.customer_ref.name;
    if let Some(cached) = ctx.subscriptions_of(&namespace, customer).await {
        return Ok(cached);
    }
    let api: Api<Subscription> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = format!("spec.customerRef.name={customer}");
    Ok(api
        .list(&ListParams::default().fields(&selector))
        .await
        .at(Step::Load("the customer's Subscriptions"))?
        .items)
}

/// Writes a Ready=False status for something that resolves by itself or by an admin,
/// and retries later (the watches on Customers and siblings usually come first).
async fn blocked(
    api: &Api<Subscription>,
    sub: &Subscription,
    ctx: &Context,
    blocker: Blocker,
) -> Result<Action, Error> {
    let namespace = sub.namespace().unwrap_or_default();
    let in_force = subscriptions::live_by_k8s_ref(&ctx.db, &namespace, &sub.name_any())
        .await
        .at(Step::Load("the subscription record"))?;
    let status_of = |b: &Blocker| build::blocked_status(sub, b, in_force.as_ref());
    lifecycle::report_blocked(ctx, api, sub, blocker, status_of).await
}

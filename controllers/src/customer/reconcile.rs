//! Applying a Customer: load its row (and the record `spec.id` adopts), plan, one
//! Postgres transaction (row + outbox), then etcd, then status. The pipeline:
//! [`crate::pipeline`].

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use m3o_crds::Customer;
use sqlx::PgConnection;

use super::build;
use super::plan::{self, Adoption, Desired};
use crate::pipeline::outbox_events;
use crate::pipeline::row_plan::RowWrite;
use crate::report::blocker::Blocker;
use crate::report::error::{AtStep, Error, Step};
use crate::report::lifecycle;
use crate::runtime::context::Context;
use crate::store::{self, customers, customers::CustomerRow};
use m3o_platform_contract::customer_key;

/// Converges Postgres, etcd and status on the Customer's spec.
pub async fn apply(customer: Arc<Customer>, ctx: &Context) -> Result<Action, Error> {
    let api: Api<Customer> = Api::namespaced(
        ctx.client.clone(),
        &customer.namespace().unwrap_or_default(),
    );
    // Blocked: written to status and retried later (an admin may fix what blocks it
    // without a change to this resource).
    let blocked = |b: &Blocker| build::blocked_status(&customer, b);
    let desired = match plan::desired(&customer) {
        Ok(d) => d,
        Err(b) => return lifecycle::report_blocked(ctx, &api, &customer, b, blocked).await,
    };
    let synced = sync_record(ctx, &customer, &desired)
        .await
        .at(Step::Database)?;
    let row = match synced {
        Ok(row) => row,
        Err(b) => return lifecycle::report_blocked(ctx, &api, &customer, b, blocked).await,
    };

    let key = ctx.platform.key(&customer_key(row.id));
    lifecycle::converge_customers(ctx, [row.id]).await?;

    let status = build::provisioned_status(&customer, &row, &key);
    let note = build::provisioned_note(&row, &key);
    lifecycle::report_provisioned(ctx, &api, &customer, &status, note).await
}

/// The database step: finds the row (by spec.id, else by namespace/name), writes what
/// the plan says and its events in one transaction.
async fn sync_record(
    ctx: &Context,
    customer: &Customer,
    desired: &Desired,
) -> Result<Result<CustomerRow, Blocker>, Error> {
    let mut tx = ctx.begin_write().await?;
    let existing = match find_row(&mut tx, ctx, desired).await? {
        Ok(row) => row,
        Err(blocker) => return Ok(Err(blocker)),
    };
    let row_plan = plan::plan_row(existing.as_ref(), desired);
    let written = match row_plan.write {
        RowWrite::Keep(row) => return Ok(Ok(row.clone())),
        RowWrite::Insert(id) => customers::insert(&mut tx, id, &desired.record).await,
        RowWrite::Update(row) => customers::update(&mut tx, row.id, &desired.record).await,
    };
    let row = match written {
        Ok(row) => row,
        Err(err) if store::unique_violation(&err).as_deref() == Some("customers_live_email") => {
            drop(tx);
            return email_conflict(ctx, customer, &desired.record.email).await;
        }
        Err(err) => return Err(err.into()),
    };
    let events: Vec<_> = row_plan
        .events
        .iter()
        .map(|t| build::event(&row, *t))
        .collect();
    outbox_events::enqueue(&mut tx, events).await?;
    tx.commit().await?;
    tracing::info!(customer = %row.id, events = ?row_plan.events, "customer record written");
    Ok(Ok(row))
}

/// The row this resource owns, locked, loaded in the order the adoption rules of
/// `spec.id` ([`plan::own_row_conflict`], [`plan::adoption`]) need it.
async fn find_row(
    tx: &mut PgConnection,
    ctx: &Context,
    desired: &Desired,
) -> Result<Result<Option<CustomerRow>, Blocker>, Error> {
    let k8s = &desired.record.k8s;
    let own = customers::lock_live_by_k8s_ref(tx, &k8s.namespace, &k8s.name).await?;
    let Some(adopt_id) = desired.adopt_id else {
        return Ok(Ok(own));
    };
    if let Some(blocker) = plan::own_row_conflict(adopt_id, own.as_ref()) {
        return Ok(Err(blocker));
    }
    let Some(target) = customers::lock_by_id(tx, adopt_id).await? else {
        return Ok(Ok(None));
    };
    Ok(match plan::adoption(adopt_id, k8s, &target) {
        Adoption::Take => Ok(Some(target)),
        Adoption::Blocked(blocker) => Err(blocker),
        Adoption::AskHolder if holder_exists(ctx, &target).await? => {
            Err(plan::holder_conflict(adopt_id, &target))
        }
        Adoption::AskHolder => Ok(Some(target)),
    })
}

/// True when the resource a row points at still exists (same uid).
async fn holder_exists(ctx: &Context, row: &CustomerRow) -> Result<bool, Error> {
    if row.k8s_namespace.is_empty() || row.k8s_name.is_empty() {
        return Ok(false);
    }
    let api: Api<Customer> = Api::namespaced(ctx.client.clone(), &row.k8s_namespace);
    Ok(api
        .get_opt(&row.k8s_name)
        .await
        .at(Step::Load("the Customer holding the record"))?
        .is_some_and(|c| c.uid().as_deref() == Some(row.k8s_uid.as_str())))
}

async fn email_conflict(
    ctx: &Context,
    customer: &Customer,
    email: &str,
) -> Result<Result<CustomerRow, Blocker>, Error> {
    let holder = customers::live_email_holder(&ctx.db, email)
        .await
        .at(Step::Load("the holder of the email"))?;
    match holder {
        Some(holder) => Ok(Err(plan::email_conflict(email, &holder, customer))),
        // The holder went away between the insert and this read: just try again.
        None => Err(Error::Transient(format!(
            "email {email} was briefly in use"
        ))),
    }
}

//! Applying a Customer: one Postgres transaction (row + outbox), then etcd, then status.

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use m3o_crds::Customer;
use m3o_events::outbox::{self, OutboxMessage};
use sqlx::PgConnection;
use uuid::Uuid;

use super::plan::{self, Desired, RowWrite};
use crate::context::Context;
use crate::error::{AtStep, Error, Step};
use crate::lifecycle;
use crate::platform::desired::customer_key;
use crate::platform::sync;
use crate::status::reasons;
use crate::store::{self, customers, customers::CustomerRow};

/// Outcome of the database step.
enum RecordOutcome {
    Synced(CustomerRow),
    /// The spec cannot be provisioned until an admin acts (reason, message).
    Blocked(&'static str, String),
}

/// Converges Postgres, etcd and status on the Customer's spec.
pub async fn apply(customer: Arc<Customer>, ctx: &Context) -> Result<Action, Error> {
    let api: Api<Customer> = Api::namespaced(
        ctx.client.clone(),
        &customer.namespace().unwrap_or_default(),
    );
    let desired = match plan::desired(&customer) {
        Ok(d) => d,
        Err(b) => return blocked(&api, &customer, ctx, b.reason, b.message).await,
    };

    let row = match sync_record(ctx, &customer, &desired)
        .await
        .at(Step::Database)?
    {
        RecordOutcome::Synced(row) => row,
        RecordOutcome::Blocked(reason, message) => {
            return blocked(&api, &customer, ctx, reason, message).await;
        }
    };

    let key = ctx.platform.key(&customer_key(row.id));
    sync::converge_customer(ctx, row.id)
        .await
        .at(Step::ConfigStore)?;

    let status = plan::provisioned_status(&customer, &row, &key);
    let note = format!(
        "customer {} provisioned ({}), config at {key}",
        row.id, row.status
    );
    lifecycle::report_provisioned(ctx, &api, &customer, &status, note).await?;
    Ok(Action::requeue(ctx.settings.resync_interval))
}

/// The database step: finds the row (by spec.id, else by namespace/name), writes what
/// the plan says and its events in one transaction.
async fn sync_record(
    ctx: &Context,
    customer: &Customer,
    desired: &Desired,
) -> Result<RecordOutcome, Error> {
    let mut tx = ctx.begin_write().await?;
    let existing = match find_row(&mut tx, ctx, desired).await? {
        Ok(row) => row,
        Err(blocked) => return Ok(blocked),
    };
    let row_plan = plan::plan_row(existing.as_ref().map(CustomerRow::record).as_ref(), desired);
    let written = match (&row_plan.write, &existing) {
        (RowWrite::Keep, Some(row)) => return Ok(RecordOutcome::Synced(row.clone())),
        (RowWrite::Insert(id), _) => customers::insert(&mut tx, *id, &desired.record).await,
        (_, Some(row)) => customers::update(&mut tx, row.id, &desired.record).await,
        (_, None) => return Err(Error::Internal("planned an update without a row".into())),
    };
    let row = match written {
        Ok(row) => row,
        Err(err) if store::unique_violation(&err).as_deref() == Some("customers_live_email") => {
            drop(tx);
            return email_conflict(ctx, customer, &desired.record.email).await;
        }
        Err(err) => return Err(err.into()),
    };
    for event_type in &row_plan.events {
        let message =
            OutboxMessage::from_event(row.id.to_string(), &plan::event(&row, *event_type));
        outbox::enqueue(&mut tx, &message).await?;
    }
    tx.commit().await?;
    tracing::info!(customer = %row.id, events = ?row_plan.events, "customer record written");
    Ok(RecordOutcome::Synced(row))
}

/// The row this resource owns, locked; `Err(Blocked)` when adopting `spec.id` is not possible.
async fn find_row(
    tx: &mut PgConnection,
    ctx: &Context,
    desired: &Desired,
) -> Result<Result<Option<CustomerRow>, RecordOutcome>, Error> {
    let k8s = &desired.record.k8s;
    let own = customers::lock_live_by_k8s_ref(tx, &k8s.namespace, &k8s.name).await?;
    let Some(adopt_id) = desired.adopt_id else {
        return Ok(Ok(own));
    };
    if let Some(own) = &own
        && own.id != adopt_id
    {
        let message = format!(
            "this Customer already owns record {}; spec.id {adopt_id} names another record",
            own.id
        );
        return Ok(Err(RecordOutcome::Blocked(reasons::CONFLICT, message)));
    }
    let Some(target) = customers::lock_by_id(tx, adopt_id).await? else {
        return Ok(Ok(None));
    };
    if target.deleted_at.is_some() {
        let message =
            format!("record {adopt_id} was deleted; remove spec.id to create a new record");
        return Ok(Err(RecordOutcome::Blocked(reasons::CONFLICT, message)));
    }
    if (target.k8s_namespace.as_str(), target.k8s_name.as_str())
        != (k8s.namespace.as_str(), k8s.name.as_str())
        && holder_exists(ctx, &target).await?
    {
        let message = format!(
            "record {adopt_id} belongs to Customer {}/{}; delete it with deletionPolicy Orphan first",
            target.k8s_namespace, target.k8s_name
        );
        return Ok(Err(RecordOutcome::Blocked(reasons::CONFLICT, message)));
    }
    Ok(Ok(Some(target)))
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
) -> Result<RecordOutcome, Error> {
    let holder = customers::live_email_holder(&ctx.db, email)
        .await
        .at(Step::Load("the holder of the email"))?;
    match holder {
        Some(holder) => {
            let message = plan::email_conflict_message(email, &holder, customer);
            Ok(RecordOutcome::Blocked(reasons::CONFLICT, message))
        }
        // The holder went away between the insert and this read: just try again.
        None => Err(Error::Transient(format!(
            "email {email} was briefly in use"
        ))),
    }
}

/// Writes a Ready=False status for something only an admin can fix and retries later
/// (the blocker may go away without a change to this resource).
async fn blocked(
    api: &Api<Customer>,
    customer: &Customer,
    ctx: &Context,
    reason: &'static str,
    message: String,
) -> Result<Action, Error> {
    let status = plan::blocked_status(customer, reason, message.clone());
    lifecycle::report_blocked(ctx, api, customer, &status, reason, message).await
}

/// The customer id a resource is known by, for cleanup when its row is gone.
pub fn known_id(customer: &Customer) -> Option<Uuid> {
    let status_id = customer
        .status
        .as_ref()
        .and_then(|s| s.customer_id.as_deref());
    status_id
        .or(customer.spec.id.as_deref())
        .and_then(|id| Uuid::parse_str(id).ok())
}

//! May a dependent (Subscription, ApiKey) use its Customer: the one gate both kinds
//! call, pure and unit-tested. It answers use this row, wait quietly, or why not (a
//! [`Blocker`] for another shard, a [`Refusal`] otherwise); what a kind requires of its
//! Customer ([`Requires`]) and how it words a refusal are the kind's (its `plan.rs`).
//!
//! In order: a Customer of another shard blocks ([`shard::admits_customer`]); one being
//! provisioned ([`being_provisioned`]) is waited for without a status write; then the
//! kind's requirement decides.

use kube::ResourceExt;
use m3o_crds::Customer;

use crate::report::blocker::Blocker;
use crate::report::status::HasStatus;
use crate::runtime::context::Context;
use crate::runtime::referents::CustomerReferent;
use crate::runtime::shard::{self, Shard};
use crate::store::customers::CustomerRow;

/// What a dependent requires of its Customer before it uses the customer's row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requires {
    /// A live row is enough, whatever the Customer object's state (ApiKey): a key keeps
    /// following its spec, and its customer's ban or deletion, while the Customer is not
    /// Ready (an outage, a failed update); issuing a new key asks for Ready separately.
    LiveRecord,
    /// A Customer that exists, is not being deleted, is Ready, and whose live row is
    /// its own (same uid: not one left by an earlier incarnation) (Subscription).
    ReadyCustomer,
}

/// The gate's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Gate<'a> {
    /// Use this customer row.
    Use(&'a CustomerRow),
    /// The Customer is being provisioned: retry later, quietly (its status change wakes
    /// the dependent through the shared Customer feed).
    Wait,
    /// The Customer is in another shard: nothing can be written here.
    Blocked(Blocker),
    /// The Customer does not meet the kind's requirement, for the kind to word.
    Refused(Refusal),
}

/// Why a Customer cannot be used, for the kind to word as a [`Blocker`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No Customer object of that name.
    NotFound,
    /// The Customer is being deleted.
    Deleting,
    /// Its Ready condition is not True (its reason and message).
    NotReady { reason: String, message: String },
    /// It has no Ready condition.
    NotProvisioned,
    /// It has no live row (of its own uid, under [`Requires::ReadyCustomer`]).
    NoRecord,
}

/// True while a Customer is being provisioned: it exists, is not being deleted, and has
/// no Ready condition yet (a failure to provision it is reported there). A dependent
/// waits for it without writing a status, so a bulk apply of customers with their
/// subscriptions and keys costs no "not ready" status or Event per dependent.
pub fn being_provisioned(customer: &Customer) -> bool {
    customer.metadata.deletion_timestamp.is_none() && customer.ready_condition().is_none()
}

/// What a pass that answered [`Gate::Wait`] returns. When the shared Customer watch had
/// listed before the pass read the Customer (`listed`), nothing: the Customer changes
/// before it is Ready or fails, and every change after that list reaches the dependent
/// through the feed (a timed retry would only wait again, every retry interval, for as
/// long as a bulk apply keeps the Customer in its queue). Before that list (a start),
/// the list may take in that change without passing it on: retry after `retry`.
pub fn wait(listed: bool, retry: std::time::Duration) -> kube::runtime::controller::Action {
    use kube::runtime::controller::Action;
    if listed {
        Action::await_change()
    } else {
        Action::requeue(retry)
    }
}

/// The part of [`gate`] decided by the Customer object alone: another shard blocks, a
/// Customer being provisioned is waited for. A pass it answers needs no record, so the
/// caller reads none (a bulk apply's quiet waits cost no Postgres statement).
pub fn before_records(shard: Option<&Shard>, customer: Option<&Customer>) -> Option<Gate<'static>> {
    let customer = customer?;
    // A Customer of another shard is reported, whatever its state.
    if let Err(blocker) = shard::admits_customer(shard, customer) {
        return Some(Gate::Blocked(blocker));
    }
    being_provisioned(customer).then_some(Gate::Wait)
}

/// True when a pass of a dependent of `customer` would only wait, quietly, for it to be
/// provisioned ([`before_records`] answers [`Gate::Wait`]): not when the Customer is
/// unknown (`None`: the pass reports it).
pub fn only_waits(shard: Option<&Shard>, customer: Option<&Customer>) -> bool {
    matches!(before_records(shard, customer), Some(Gate::Wait))
}

/// True when a pass of `dependent` would only wait for its Customer, as the shared
/// watch's cache tells without I/O (see `ResyncedKind::waits_for_customer`); never for
/// a deletion.
pub fn waits_in_cache<K: CustomerReferent>(ctx: &Context, dependent: &K) -> bool {
    let meta = dependent.meta();
    let customer = ctx.cached_customer(
        meta.namespace.as_deref().unwrap_or_default(),
        dependent.customer_name(),
    );
    meta.deletion_timestamp.is_none()
        && only_waits(ctx.settings.shard.as_ref(), customer.as_deref())
}

/// May a dependent use its Customer: `customer` is the object its `customerRef` names
/// (if any), `row` that Customer's live row (if any).
pub fn gate<'a>(
    requires: Requires,
    shard: Option<&Shard>,
    customer: Option<&Customer>,
    row: Option<&'a CustomerRow>,
) -> Gate<'a> {
    if let Some(early) = before_records(shard, customer) {
        return early;
    }
    match required(requires, customer, row) {
        Ok(row) => Gate::Use(row),
        Err(refusal) => Gate::Refused(refusal),
    }
}

/// The kind's requirement, once the Customer is in this shard and not being provisioned.
fn required<'a>(
    requires: Requires,
    customer: Option<&Customer>,
    row: Option<&'a CustomerRow>,
) -> Result<&'a CustomerRow, Refusal> {
    let Some(customer) = customer else {
        return match (requires, row) {
            (Requires::LiveRecord, Some(row)) => Ok(row),
            _ => Err(Refusal::NotFound),
        };
    };
    if requires == Requires::LiveRecord {
        return row.ok_or(Refusal::NoRecord);
    }
    if customer.metadata.deletion_timestamp.is_some() {
        return Err(Refusal::Deleting);
    }
    match customer.ready_condition() {
        Some(c) if c.status == "True" => {}
        Some(c) => {
            return Err(Refusal::NotReady {
                reason: c.reason.clone(),
                message: c.message.clone(),
            });
        }
        None => return Err(Refusal::NotProvisioned),
    }
    match row {
        Some(row) if customer.uid().as_deref() == Some(row.k8s_uid.as_str()) => Ok(row),
        _ => Err(Refusal::NoRecord),
    }
}

#[cfg(test)]
mod tests;

//! Every decision about a Subscription, pure and unit-tested: the effective quota, what
//! it requires of its Customer, the one rule for a customer's slot, the row write and its events, and
//! the customer cleanup goes by. The pipeline: [`crate::pipeline`].

use std::cmp::Ordering;

use kube::ResourceExt;
use m3o_crds::{Customer, Quota, Subscription, SubscriptionSpec};
use m3o_events::customers::EventType;
use uuid::Uuid;

use crate::pipeline::dependent::{self, Gate, Refusal, Requires};
use crate::pipeline::k8s_ref::K8sRef;
use crate::pipeline::row_plan::{self, Recorded, RowPlan, RowWrite};
use crate::plans::Catalog;
use crate::report::blocker::Blocker;
use crate::report::status::reasons;
use crate::runtime::shard::Shard;
use crate::store::customers::CustomerRow;
use crate::store::subscriptions::{SubscriptionRecord, SubscriptionRow};

/// The effective quota: the plan's defaults, overridden field by field by `spec.quota`.
pub fn effective_quota(catalog: &Catalog, spec: &SubscriptionSpec) -> Result<Quota, Blocker> {
    let Some(defaults) = catalog.get(&spec.plan) else {
        let message = format!(
            "plan {:?} is not in the plan catalog; use one of: {}",
            spec.plan,
            catalog.names()
        );
        return Err(Blocker::new(reasons::UNKNOWN_PLAN, message));
    };
    let overrides = spec.quota.unwrap_or_default();
    Ok(Quota {
        monthly_requests: overrides
            .monthly_requests
            .unwrap_or(defaults.monthly_requests),
        requests_per_second: overrides
            .requests_per_second
            .unwrap_or(defaults.requests_per_second),
    })
}

/// May the Subscription use its Customer ([`dependent::gate`]): only a Ready Customer
/// whose live row is its own carries a subscription (a plan in force for a customer
/// that is not there yet, or no longer, would bill nobody). A refusal is worded by
/// [`customer_refusal`].
pub fn customer_use<'a>(
    shard: Option<&Shard>,
    customer: Option<&Customer>,
    row: Option<&'a CustomerRow>,
) -> Gate<'a> {
    dependent::gate(Requires::ReadyCustomer, shard, customer, row)
}

/// How a Subscription words a refusal of its Customer `name`.
pub fn customer_refusal(name: &str, refusal: Refusal) -> Blocker {
    let why = match refusal {
        Refusal::NotFound => {
            let message = format!(
                "Customer {name} does not exist in this namespace; create it and this Subscription follows"
            );
            return Blocker::new(reasons::CUSTOMER_NOT_FOUND, message);
        }
        Refusal::Deleting => "is being deleted".to_owned(),
        Refusal::NotReady { reason, message } => format!("is not Ready ({reason}: {message})"),
        Refusal::NotProvisioned => "is not provisioned yet".to_owned(),
        Refusal::NoRecord => "has no customer record yet".to_owned(),
    };
    let message = format!("Customer {name} {why}; this Subscription follows once it is Ready");
    Blocker::new(reasons::CUSTOMER_NOT_READY, message)
}

/// Who holds the subscription record in force for a customer, as seen inside the
/// transaction that locked it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordHolder {
    /// No record is in force for the customer.
    Nobody,
    /// The record in force is this Subscription's own.
    This,
    /// Another Subscription (by name) that exists and is not being deleted.
    Live(String),
    /// Another Subscription (by name) that is being deleted.
    Deleting(String),
    /// The record's Subscription no longer exists (deleted with `Orphan`): adoptable.
    Gone,
}

/// The one rule for a customer's slot, used by every decision: the Subscription whose
/// record is in force keeps it while it lives; when no record is in force, or its
/// Subscription is gone, the oldest live Subscription of the customer takes it (creation
/// time, then name). `siblings` are the customer's Subscriptions, needed only in the
/// second case. `Ok` means this Subscription may write (insert, update or adopt).
pub fn slot_decision(
    this: &Subscription,
    siblings: &[Subscription],
    holder: &RecordHolder,
) -> Result<(), Blocker> {
    let customer = &this.spec.customer_ref.name;
    match holder {
        RecordHolder::This => Ok(()),
        RecordHolder::Live(name) => Err(conflict(customer, name, false)),
        RecordHolder::Deleting(name) => Err(conflict(customer, name, true)),
        RecordHolder::Nobody | RecordHolder::Gone => match slot_holder(this, siblings) {
            Some(older) => Err(conflict(customer, &older.name_any(), false)),
            None => Ok(()),
        },
    }
}

/// The Subscription next in line for its customer's slot, when it is not `this`: the
/// oldest live (not being deleted) Subscription of the same customer, by creation time,
/// then name.
pub fn slot_holder<'a>(
    this: &Subscription,
    siblings: &'a [Subscription],
) -> Option<&'a Subscription> {
    let customer = &this.spec.customer_ref.name;
    let holder = siblings
        .iter()
        .filter(|s| &s.spec.customer_ref.name == customer)
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .filter(|s| s.namespace() == this.namespace())
        .min_by(|a, b| age_order(a, b))?;
    (holder.name_any() != this.name_any() && age_order(holder, this) == Ordering::Less)
        .then_some(holder)
}

/// Older first; a missing creation time (not yet persisted) counts as newest.
fn age_order(a: &Subscription, b: &Subscription) -> Ordering {
    let created = |s: &Subscription| {
        s.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(i64::MAX)
    };
    created(a)
        .cmp(&created(b))
        .then_with(|| a.name_any().cmp(&b.name_any()))
}

/// The customer's record was deleted while this Subscription was being written.
pub fn customer_gone(name: &str) -> Blocker {
    let message =
        format!("Customer {name} was deleted; this Subscription follows if it is created again");
    Blocker::new(reasons::CUSTOMER_NOT_FOUND, message)
}

/// Conflict with the Subscription named `holder`.
pub fn conflict(customer: &str, holder: &str, holder_deleting: bool) -> Blocker {
    let message = if holder_deleting {
        format!(
            "Customer {customer}'s subscription is held by Subscription {holder}, which is being deleted; this one takes over once it is gone"
        )
    } else {
        format!(
            "Customer {customer} already has Subscription {holder} (the oldest one holds it); delete this one, or {holder} to switch"
        )
    };
    Blocker::new(reasons::CONFLICT, message)
}

/// What the resource asks for, for a customer record and an effective quota.
pub fn desired_record(sub: &Subscription, customer_id: Uuid, quota: Quota) -> SubscriptionRecord {
    SubscriptionRecord {
        customer_id,
        plan: sub.spec.plan.clone(),
        monthly_requests: quota.monthly_requests,
        requests_per_second: quota.requests_per_second,
        k8s: K8sRef::of(&sub.metadata),
        generation: sub.metadata.generation.unwrap_or_default(),
    }
}

/// Decides the write and the events. `SubscriptionChanged` announces a tier: it is sent
/// when a subscription comes into force and when its plan (or customer) changes; quota
/// overrides, catalog edits and bookkeeping update the row (and etcd) silently.
pub fn plan_row<'a, R: Recorded<Record = SubscriptionRecord>>(
    existing: Option<&'a R>,
    desired: &SubscriptionRecord,
) -> RowPlan<'a, R> {
    let write = row_plan::decide(existing, desired, Uuid::now_v7());
    let tier_changed = match &write {
        RowWrite::Insert(_) => true,
        RowWrite::Keep(_) => false,
        RowWrite::Update(old) => {
            let old = old.record();
            old.plan != desired.plan || old.customer_id != desired.customer_id
        }
    };
    let events = match tier_changed {
        true => vec![EventType::SubscriptionChanged],
        false => vec![],
    };
    RowPlan { write, events }
}

/// Whether the resource's own record in force stays its record: only while it is of
/// the customer the resource names now. Otherwise (none, or one of a customer that was
/// re-created, which then moves to the new one) the slot rule decides.
pub fn keeps_own_record(own: Option<&SubscriptionRow>, customer_id: Uuid) -> bool {
    own.is_some_and(|own| own.customer_id == customer_id)
}

/// The customer a resource was known to belong to, for cleanup when its row is gone.
pub fn known_customer_id(sub: &Subscription) -> Option<Uuid> {
    sub.status
        .as_ref()
        .and_then(|s| s.customer_id.as_deref())
        .and_then(|id| Uuid::parse_str(id).ok())
}

#[cfg(test)]
mod tests;

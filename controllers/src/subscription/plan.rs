//! Pure planning for Subscriptions: from the resource, the plan catalog, its Customer
//! and its row (if any) to the row write, the events it announces, and the status.
//! No I/O, unit-tested.

use std::cmp::Ordering;

use kube::ResourceExt;
use m3o_crds::{
    Customer, Quota, Subscription, SubscriptionSpec, SubscriptionState, SubscriptionStatus,
};
use m3o_events::customers::{self, EventType};
use uuid::Uuid;

use crate::customer::plan as customer_plan;
use crate::plans::Catalog;
use crate::status::{Cond, merge, not_synced, reasons, types};
use crate::k8s_ref::K8sRef;
use crate::store::customers::CustomerRow;
use crate::store::subscriptions::{SubscriptionRecord, SubscriptionRow};

pub use crate::blocker::Blocker;

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

/// The customer's row when the Customer is ready to carry a subscription.
pub fn customer_gate<'a>(
    customer: Option<&Customer>,
    row: Option<&'a CustomerRow>,
    name: &str,
) -> Result<&'a CustomerRow, Blocker> {
    let Some(customer) = customer else {
        let message = format!(
            "Customer {name} does not exist in this namespace; create it and this Subscription follows"
        );
        return Err(Blocker::new(reasons::CUSTOMER_NOT_FOUND, message));
    };
    let not_ready = |why: String| {
        let message = format!("Customer {name} {why}; this Subscription follows once it is Ready");
        Err(Blocker::new(reasons::CUSTOMER_NOT_READY, message))
    };
    if customer.metadata.deletion_timestamp.is_some() {
        return not_ready("is being deleted".into());
    }
    let ready = customer
        .status
        .as_ref()
        .and_then(|s| crate::status::ready(&s.conditions));
    match ready {
        Some(c) if c.status == "True" => {}
        Some(c) => return not_ready(format!("is not Ready ({}: {})", c.reason, c.message)),
        None => return not_ready("is not provisioned yet".into()),
    }
    match row {
        Some(row) if customer.uid().as_deref() == Some(row.k8s_uid.as_str()) => Ok(row),
        _ => not_ready("has no customer record yet".into()),
    }
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

pub use crate::row_plan::{RowPlan, RowWrite};

/// Decides the write and the events. `SubscriptionChanged` announces a tier: it is sent
/// when a subscription comes into force and when its plan (or customer) changes; quota
/// overrides, catalog edits and bookkeeping update the row (and etcd) silently.
pub fn plan_row(existing: Option<&SubscriptionRecord>, desired: &SubscriptionRecord) -> RowPlan {
    let Some(old) = existing else {
        return RowPlan {
            write: RowWrite::Insert(Uuid::now_v7()),
            events: vec![EventType::SubscriptionChanged],
        };
    };
    if old == desired {
        return RowPlan {
            write: RowWrite::Keep,
            events: vec![],
        };
    }
    let tier_changed = old.plan != desired.plan || old.customer_id != desired.customer_id;
    RowPlan {
        write: RowWrite::Update,
        events: if tier_changed {
            vec![EventType::SubscriptionChanged]
        } else {
            vec![]
        },
    }
}

/// The customer payload of an event: from its row, or just the id when the row is gone.
pub fn customer_payload(customer_id: Uuid, row: Option<&CustomerRow>) -> customers::Customer {
    row.map(customer_plan::payload)
        .unwrap_or_else(|| customers::Customer {
            id: customer_id.to_string(),
            ..Default::default()
        })
}

/// The event of type `t` (`SubscriptionChanged` or `SubscriptionCancelled`) for `tier`.
pub fn event(customer: customers::Customer, t: EventType, tier: &str) -> customers::Event {
    let mut event = customers::Event {
        customer: Some(customer),
        ..Default::default()
    };
    event.set_type(t);
    let tier = tier.to_owned();
    match t {
        EventType::SubscriptionChanged => {
            event.subscription_changed = Some(customers::SubscriptionChanged { tier });
        }
        EventType::SubscriptionCancelled => {
            event.subscription_cancelled = Some(customers::SubscriptionCancelled { tier });
        }
        _ => {}
    }
    event
}

/// The status fields describing the row in force (or none: pending).
fn in_force(previous: SubscriptionStatus, row: Option<&SubscriptionRow>) -> SubscriptionStatus {
    let Some(row) = row else {
        // In force before and not now: cancelled under it (its Customer was deleted).
        let state = match previous.state {
            Some(SubscriptionState::Active | SubscriptionState::Cancelled) => {
                SubscriptionState::Cancelled
            }
            _ => SubscriptionState::Pending,
        };
        return SubscriptionStatus {
            subscription_id: None,
            plan: None,
            quota: None,
            state: Some(state),
            ..previous
        };
    };
    SubscriptionStatus {
        subscription_id: Some(row.id.to_string()),
        customer_id: Some(row.customer_id.to_string()),
        plan: Some(row.plan.clone()),
        quota: Some(Quota {
            monthly_requests: row.monthly_requests,
            requests_per_second: row.requests_per_second,
        }),
        state: Some(SubscriptionState::Active),
        ..previous
    }
}

/// Status once Postgres and etcd both match.
pub fn provisioned_status(
    sub: &Subscription,
    row: &SubscriptionRow,
    quota_key: &str,
) -> SubscriptionStatus {
    let generation = sub.metadata.generation;
    let previous = sub.status.clone().unwrap_or_default();
    let conditions = merge(
        &previous.conditions,
        &[
            Cond::new(
                types::DATABASE_SYNCED,
                true,
                reasons::SYNCED,
                format!("record {} is up to date", row.id),
            ),
            Cond::new(
                types::CONFIG_SYNCED,
                true,
                reasons::SYNCED,
                format!("{quota_key} is up to date"),
            ),
            Cond::new(
                types::READY,
                true,
                reasons::PROVISIONED,
                format!(
                    "plan {} in force: {} requests a month, {} per second",
                    row.plan, row.monthly_requests, row.requests_per_second
                ),
            ),
        ],
        generation,
    );
    SubscriptionStatus {
        observed_generation: generation,
        conditions,
        ..in_force(previous, Some(row))
    }
}

/// Status of a Subscription that cannot be put in force as specified; `row` is what
/// stays in force meanwhile (if anything), so status never claims more than etcd holds.
pub fn blocked_status(
    sub: &Subscription,
    blocker: &Blocker,
    row: Option<&SubscriptionRow>,
) -> SubscriptionStatus {
    let generation = sub.metadata.generation;
    let previous = sub.status.clone().unwrap_or_default();
    let (reason, message) = (blocker.reason, blocker.message.clone());
    let conditions = not_synced(&previous.conditions, reason, message, generation);
    SubscriptionStatus {
        observed_generation: generation,
        conditions,
        ..in_force(previous, row)
    }
}

#[cfg(test)]
mod tests;

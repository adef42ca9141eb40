//! Pure planning for Customers: from the resource and its row (if any) to the row
//! write, the events it announces, and the status. No I/O, unit-tested.

use kube::ResourceExt;
use m3o_crds::{Customer, CustomerStatus, CustomerStatusState};
use m3o_events::customers::{self, EventType};
use uuid::Uuid;

use crate::blocker::Blocker;
use crate::status::{Cond, merge, not_synced, reasons, types};
use crate::k8s_ref::K8sRef;
use crate::store::customers::{CustomerRecord, CustomerRow};

/// What the resource asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// `spec.id`: a record to adopt.
    pub adopt_id: Option<Uuid>,
    pub record: CustomerRecord,
}

/// Reads the desired record off the resource. The schema already validated the spec;
/// what remains is what only the controller can tell.
pub fn desired(customer: &Customer) -> Result<Desired, Blocker> {
    let adopt_id = match &customer.spec.id {
        Some(id) => Some(Uuid::parse_str(id).map_err(|e| {
            Blocker::new(
                reasons::INVALID_SPEC,
                format!("spec.id {id:?} is not a UUID: {e}"),
            )
        })?),
        None => None,
    };
    let record = CustomerRecord {
        email: customer.spec.email.trim().to_owned(),
        name: customer.spec.name.clone().unwrap_or_default(),
        status: customer.spec.state.as_m3o().as_str().to_owned(),
        meta: customer.spec.meta.clone(),
        k8s: K8sRef::of(&customer.metadata),
        generation: customer.metadata.generation.unwrap_or_default(),
    };
    Ok(Desired { adopt_id, record })
}

pub use crate::row_plan::{RowPlan, RowWrite};

/// Decides the write and the events: one event per transition, none on a repeat.
pub fn plan_row(existing: Option<&CustomerRecord>, desired: &Desired) -> RowPlan {
    let new = &desired.record;
    let Some(old) = existing else {
        let id = desired.adopt_id.unwrap_or_else(Uuid::now_v7);
        return RowPlan {
            write: RowWrite::Insert(id),
            events: vec![EventType::Created],
        };
    };
    if old == new {
        return RowPlan {
            write: RowWrite::Keep,
            events: vec![],
        };
    }
    let mut events = Vec::new();
    if old.status != new.status {
        use CustomerStatusState::{Banned, Verified};
        let from = CustomerStatusState::parse(&old.status);
        let to = CustomerStatusState::parse(&new.status);
        events.push(match (from, to) {
            (_, Some(Banned)) => EventType::Banned,
            (Some(Banned), _) => EventType::Unbanned,
            (_, Some(Verified)) => EventType::Verified,
            _ => EventType::Updated,
        });
    }
    let fields_changed = old.email != new.email || old.name != new.name || old.meta != new.meta;
    if fields_changed && !events.contains(&EventType::Updated) {
        events.push(EventType::Updated);
    }
    // Generation or k8s identity alone changed (re-applied, re-adopted): bookkeeping, no event.
    RowPlan {
        write: RowWrite::Update,
        events,
    }
}

/// The M3O customer payload of a row.
pub fn payload(row: &CustomerRow) -> customers::Customer {
    customers::Customer {
        id: row.id.to_string(),
        status: row.status.clone(),
        created: row.created_at.timestamp(),
        email: row.email.clone(),
        updated: row.updated_at.timestamp(),
        name: row.name.clone(),
        meta: row.meta.0.clone().into_iter().collect(),
    }
}

/// The event of type `t` about `row`.
pub fn event(row: &CustomerRow, t: EventType) -> customers::Event {
    let mut event = customers::Event {
        customer: Some(payload(row)),
        ..Default::default()
    };
    event.set_type(t);
    match t {
        EventType::Created => event.created = Some(Default::default()),
        EventType::Updated => event.updated = Some(Default::default()),
        EventType::Deleted => event.deleted = Some(Default::default()),
        EventType::Verified => event.verified = Some(Default::default()),
        EventType::Banned => event.banned = Some(Default::default()),
        EventType::Unbanned => event.unbanned = Some(Default::default()),
        _ => {}
    }
    event
}

/// Status once Postgres and etcd both match.
pub fn provisioned_status(
    customer: &Customer,
    row: &CustomerRow,
    config_key: &str,
) -> CustomerStatus {
    let generation = customer.metadata.generation;
    let existing = customer
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let state = CustomerStatusState::parse(&row.status);
    let conditions = merge(
        existing,
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
                format!("{config_key} is up to date"),
            ),
            Cond::new(
                types::READY,
                true,
                reasons::PROVISIONED,
                format!("customer {} is {}", row.id, row.status),
            ),
        ],
        generation,
    );
    CustomerStatus {
        observed_generation: generation,
        conditions,
        customer_id: Some(row.id.to_string()),
        state,
    }
}

/// Status of a Customer that cannot be provisioned as specified (Ready=False, `reason`).
pub fn blocked_status(
    customer: &Customer,
    reason: &'static str,
    message: String,
) -> CustomerStatus {
    let generation = customer.metadata.generation;
    let previous = customer.status.clone().unwrap_or_default();
    let conditions = not_synced(&previous.conditions, reason, message, generation);
    CustomerStatus {
        observed_generation: generation,
        conditions,
        ..previous
    }
}

/// Message of an email conflict: names the holder and says what to do.
pub fn email_conflict_message(email: &str, holder: &K8sRef, this: &Customer) -> String {
    let who = if holder.namespace == this.namespace().unwrap_or_default() {
        format!("Customer {}", holder.name)
    } else {
        format!("Customer {}/{}", holder.namespace, holder.name)
    };
    format!("email {email} is already used by {who}; use another email or delete {who}")
}

#[cfg(test)]
mod tests;

//! Every decision about a Customer, pure and unit-tested: the record it asks for, the
//! row write and its events, the adoption rules of `spec.id`, the email conflict, and
//! the id cleanup goes by. The pipeline: [`crate::pipeline`].

use kube::ResourceExt;
use m3o_crds::{Customer, CustomerStatusState};
use m3o_events::customers::EventType;
use uuid::Uuid;

use crate::pipeline::k8s_ref::K8sRef;
use crate::pipeline::row_plan::{self, Recorded, RowPlan, RowWrite};
use crate::report::blocker::Blocker;
use crate::report::status::reasons;
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

/// Decides the write and the events: one event per transition, none on a repeat.
pub fn plan_row<'a, R: Recorded<Record = CustomerRecord>>(
    existing: Option<&'a R>,
    desired: &Desired,
) -> RowPlan<'a, R> {
    let new_id = desired.adopt_id.unwrap_or_else(Uuid::now_v7);
    let write = row_plan::decide(existing, &desired.record, new_id);
    let events = match &write {
        RowWrite::Insert(_) => vec![EventType::Created],
        RowWrite::Keep(_) => vec![],
        RowWrite::Update(old) => transitions(&old.record(), &desired.record),
    };
    RowPlan { write, events }
}

/// The events of a changed record. Generation or k8s identity alone (re-applied,
/// re-adopted) is bookkeeping: no event.
fn transitions(old: &CustomerRecord, new: &CustomerRecord) -> Vec<EventType> {
    use CustomerStatusState::{Banned, Verified};
    let mut events = Vec::new();
    if old.status != new.status {
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
    events
}

/// The first adoption rule, on the resource's own live row: a Customer that owns a
/// record cannot adopt another one.
pub fn own_row_conflict(adopt_id: Uuid, own: Option<&CustomerRow>) -> Option<Blocker> {
    let own = own.filter(|own| own.id != adopt_id)?;
    let message = format!(
        "this Customer already owns record {}; spec.id {adopt_id} names another record",
        own.id
    );
    Some(Blocker::new(reasons::CONFLICT, message))
}

/// What the record `spec.id` names allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// Adopt it.
    Take,
    /// It belongs to another Customer: adoptable only once that one is gone
    /// ([`holder_conflict`] if it is not).
    AskHolder,
    Blocked(Blocker),
}

/// The rules on the record `spec.id` names (locked): a deleted record is not revived;
/// one of another Customer is taken only when that Customer is gone.
pub fn adoption(adopt_id: Uuid, this: &K8sRef, target: &CustomerRow) -> Adoption {
    if target.deleted_at.is_some() {
        let message =
            format!("record {adopt_id} was deleted; remove spec.id to create a new record");
        return Adoption::Blocked(Blocker::new(reasons::CONFLICT, message));
    }
    let same = (target.k8s_namespace.as_str(), target.k8s_name.as_str())
        == (this.namespace.as_str(), this.name.as_str());
    if same {
        Adoption::Take
    } else {
        Adoption::AskHolder
    }
}

/// The record `spec.id` names belongs to a Customer that still exists.
pub fn holder_conflict(adopt_id: Uuid, target: &CustomerRow) -> Blocker {
    let message = format!(
        "record {adopt_id} belongs to Customer {}/{}; delete it with deletionPolicy Orphan first",
        target.k8s_namespace, target.k8s_name
    );
    Blocker::new(reasons::CONFLICT, message)
}

/// An email held by another live customer: names the holder and says what to do.
pub fn email_conflict(email: &str, holder: &K8sRef, this: &Customer) -> Blocker {
    let who = if holder.namespace == this.namespace().unwrap_or_default() {
        format!("Customer {}", holder.name)
    } else {
        format!("Customer {}/{}", holder.namespace, holder.name)
    };
    let message =
        format!("email {email} is already used by {who}; use another email or delete {who}");
    Blocker::new(reasons::CONFLICT, message)
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

#[cfg(test)]
mod tests;

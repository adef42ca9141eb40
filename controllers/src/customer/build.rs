//! Pure builders of what a Customer reconcile writes besides its row: the M3O event
//! payloads and the status. The pipeline: [`crate::pipeline`].

use m3o_crds::{Customer, CustomerStatus, CustomerStatusState};
use m3o_events::customers::{self, EventType};

use crate::pipeline::outbox_events::customer_payload;
use crate::report::blocker::Blocker;
use crate::report::status::{self, Cond, merge, not_synced, reasons, types};
use crate::store::customers::CustomerRow;

/// The event of type `t` about `row`, with its aggregate id (the customer).
pub fn event(row: &CustomerRow, t: EventType) -> (String, customers::Event) {
    let mut event = customers::Event {
        customer: Some(customer_payload(row)),
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
    (row.id.to_string(), event)
}

/// The note of the Kubernetes Event of a Customer's first provisioning.
pub fn provisioned_note(row: &CustomerRow, config_key: &str) -> String {
    format!(
        "customer {} provisioned ({}), config at {config_key}",
        row.id, row.status
    )
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
    let ready = Cond::new(
        types::READY,
        true,
        reasons::PROVISIONED,
        format!("customer {} is {}", row.id, row.status),
    );
    let conditions = merge(
        existing,
        &status::synced(
            format!("record {} is up to date", row.id),
            format!("{config_key} is up to date"),
            ready,
        ),
        generation,
    );
    CustomerStatus {
        observed_generation: generation,
        conditions,
        customer_id: Some(row.id.to_string()),
        state: CustomerStatusState::parse(&row.status),
    }
}

/// Status of a Customer that cannot be provisioned as specified (Ready=False).
pub fn blocked_status(customer: &Customer, blocker: &Blocker) -> CustomerStatus {
    let generation = customer.metadata.generation;
    let previous = customer.status.clone().unwrap_or_default();
    let (reason, message) = (blocker.reason, blocker.message.clone());
    let conditions = not_synced(&previous.conditions, reason, message, generation);
    CustomerStatus {
        observed_generation: generation,
        conditions,
        ..previous
    }
}

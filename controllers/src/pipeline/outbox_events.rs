//! Queueing a reconcile's M3O events in its transaction, for every kind (the events
//! exist if and only if the change they announce committed), and the customer payload
//! they all carry.

use m3o_events::customers;
use m3o_events::outbox::{self, OutboxMessage};
use sqlx::PgConnection;

use crate::report::error::Error;
use crate::store::customers::CustomerRow;

/// The M3O customer payload of a row: every kind's events carry it.
pub fn customer_payload(row: &CustomerRow) -> customers::Customer {
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

/// Enqueues `(aggregate id, event)` pairs in `tx`: the aggregate is the customer for
/// customer and subscription events, the key for key events.
pub async fn enqueue(
    tx: &mut PgConnection,
    events: impl IntoIterator<Item = (String, customers::Event)>,
) -> Result<(), Error> {
    for (aggregate_id, event) in events {
        outbox::enqueue(tx, &OutboxMessage::from_event(aggregate_id, &event)).await?;
    }
    Ok(())
}

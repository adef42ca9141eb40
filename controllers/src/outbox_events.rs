//! Queueing a reconcile's M3O events in its transaction, for every kind: the events
//! exist if and only if the change they announce committed.

use m3o_events::customers;
use m3o_events::outbox::{self, OutboxMessage};
use sqlx::PgConnection;

use crate::error::Error;

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

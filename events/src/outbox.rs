//! The transactional outbox: events are rows of the `outbox` table, written in the same
//! Postgres transaction as the change they announce (ARCHITECTURE.md, "Where each
//! contract lives").
//!
//! All SQL is unqualified: the connection's `search_path` selects the schema.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::TopicEvent;

pub mod admin;

/// An event to be written to the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    /// The topic, e.g. [`crate::customers::TOPIC`]; the stream key is `<prefix><topic>`.
    pub topic: &'static str,
    /// The event type's enum value name, e.g. `EventTypeCreated`.
    pub event_type: &'static str,
    /// The id of the record the event is about (e.g. the customer id).
    pub aggregate_id: String,
    /// The protobuf-encoded `Event`.
    pub payload: Vec<u8>,
}

impl OutboxMessage {
    /// Builds a message from a topic's `Event`: topic, event type name and payload come
    /// from the event itself.
    ///
    /// ```
    /// use m3o_events::customers::{Customer, Event, EventType};
    /// use m3o_events::outbox::OutboxMessage;
    ///
    /// let event = Event {
    ///     r#type: EventType::Created as i32,
    ///     customer: Some(Customer { id: "c1".into(), ..Default::default() }),
    ///     ..Default::default()
    /// };
    /// let msg = OutboxMessage::from_event("c1", &event);
    /// assert_eq!(msg.topic, "customers");
    /// assert_eq!(msg.event_type, "EventTypeCreated");
    /// ```
    pub fn from_event<E: TopicEvent>(aggregate_id: impl Into<String>, event: &E) -> Self {
        Self {
            topic: E::TOPIC,
            event_type: event.event_type_name(),
            aggregate_id: aggregate_id.into(),
            payload: event.encode_to_vec(),
        }
    }
}

/// Inserts `msg` into the outbox on `conn` and returns the new event id (a UUIDv7, so
/// ids are time ordered).
///
/// Pass the caller's transaction (`&mut *tx`): the event then commits if and only if the
/// change it announces commits. The insert fires the `outbox_notify` trigger, which wakes
/// the relay when the transaction commits.
pub async fn enqueue(conn: &mut PgConnection, msg: &OutboxMessage) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (id, topic, event_type, aggregate_id, payload) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(msg.topic)
    .bind(msg.event_type)
    .bind(&msg.aggregate_id)
    .bind(&msg.payload)
    .execute(conn)
    .await?;
    Ok(id)
}

/// Which outbox event: what the relay, its log lines and the admin commands name.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct EventRef {
    /// The event id.
    pub id: Uuid,
    /// Its place in the outbox; the relay publishes in this order.
    pub seq: i64,
    /// The topic.
    pub topic: String,
    /// The event type's enum value name.
    pub event_type: String,
    /// The id of the record the event is about.
    pub aggregate_id: String,
}

/// Unpublished outbox rows, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlog {
    /// Rows waiting to be published (not parked; held rows included).
    pub count: i64,
    /// `created_at` of the oldest of them, if any.
    pub oldest: Option<DateTime<Utc>>,
    /// Parked rows (unpublished until re-driven).
    pub parked: i64,
}

impl Backlog {
    /// Age of the oldest unpublished row at `now` (zero when the backlog is empty).
    pub fn age(&self, now: DateTime<Utc>) -> chrono::Duration {
        self.oldest
            .map(|t| (now - t).max(chrono::Duration::zero()))
            .unwrap_or_else(chrono::Duration::zero)
    }
}

/// Counts the rows waiting to be published (and finds the oldest one's `created_at`)
/// and the parked rows. Each count reads its own partial index.
pub async fn backlog<'e, E: PgExecutor<'e>>(executor: E) -> Result<Backlog, sqlx::Error> {
    let (count, oldest, parked): (i64, Option<DateTime<Utc>>, i64) = sqlx::query_as(
        "SELECT count(*), min(created_at), \
           (SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL) \
         FROM outbox WHERE published_at IS NULL AND parked_at IS NULL",
    )
    .fetch_one(executor)
    .await?;
    Ok(Backlog {
        count,
        oldest,
        parked,
    })
}

/// An outbox row as stored, for tests and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OutboxRow {
    /// The event id.
    pub id: Uuid,
    /// Insertion order; the relay publishes in this order.
    pub seq: i64,
    /// The topic.
    pub topic: String,
    /// The event type's enum value name.
    pub event_type: String,
    /// The id of the record the event is about.
    pub aggregate_id: String,
    /// The protobuf-encoded event.
    pub payload: Vec<u8>,
    /// When the row was written (transaction start time).
    pub created_at: DateTime<Utc>,
    /// When the relay published it, if it did.
    pub published_at: Option<DateTime<Utc>>,
    /// Times Redis answered a publish of it: the publish, and each refusal (times
    /// Redis was unreachable are not counted). Reset by a re-drive.
    pub attempts: i32,
    /// When the relay parked it after repeated refusals (`None`: not parked).
    pub parked_at: Option<DateTime<Utc>>,
    /// Redis's last refusal, if any.
    pub last_error: Option<String>,
}

/// All outbox rows of `aggregate_id`, in `seq` order (published or not).
pub async fn rows_for<'e, E: PgExecutor<'e>>(
    executor: E,
    aggregate_id: &str,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, seq, topic, event_type, aggregate_id, payload, created_at, published_at, \
         attempts, parked_at, last_error FROM outbox WHERE aggregate_id = $1 ORDER BY seq",
    )
    .bind(aggregate_id)
    .fetch_all(executor)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::customers::{Event, EventType};

    #[test]
    fn from_event_fills_topic_type_and_payload() {
        let event = Event {
            r#type: EventType::BlockKey as i32,
            ..Default::default()
        };
        let msg = OutboxMessage::from_event(String::from("c9"), &event);
        assert_eq!(msg.topic, crate::customers::TOPIC);
        assert_eq!(msg.event_type, "EventTypeBlockKey");
        assert_eq!(msg.aggregate_id, "c9");
        assert_eq!(msg.payload, vec![0x08, 0x10]);
    }

    #[test]
    fn backlog_age_is_never_negative() {
        let now = Utc::now();
        assert_eq!(Backlog::default().age(now), chrono::Duration::zero());
        let future = Backlog {
            count: 1,
            oldest: Some(now + chrono::Duration::seconds(5)),
            parked: 0,
        };
        assert_eq!(future.age(now), chrono::Duration::zero());
        let past = Backlog {
            count: 1,
            oldest: Some(now - chrono::Duration::seconds(5)),
            parked: 0,
        };
        assert_eq!(past.age(now), chrono::Duration::seconds(5));
    }
}

//! A resource's latest events, from the Redis stream and from the outbox.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use m3o_events::consumer::decode_entry;
use m3o_events::customers::Event;
use prost::Message;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamRangeReply;
use serde::Serialize;
use sqlx::PgPool;

use super::compare::{Subject, event_detail};

/// Stream entries read per `XREVRANGE`.
const STREAM_PAGE: usize = 500;

/// An event as published on the stream.
#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct StreamEvent {
    pub stream_id: String,
    pub id: String,
    pub event_type: String,
    pub created: String,
    pub detail: String,
}

/// The newest `n` events of `subject` on stream `key`, newest first, reading at most
/// `scan_limit` entries back. Entries that do not decode are skipped.
pub async fn from_stream(
    conn: &mut MultiplexedConnection,
    key: &str,
    subject: &Subject,
    n: usize,
    scan_limit: usize,
) -> Result<Vec<StreamEvent>, redis::RedisError> {
    let mut out = Vec::new();
    let mut end = "+".to_owned();
    let mut scanned = 0;
    while out.len() < n && scanned < scan_limit {
        let reply: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(key)
            .arg(&end)
            .arg("-")
            .arg("COUNT")
            .arg(STREAM_PAGE.min(scan_limit - scanned))
            .query_async(conn)
            .await?;
        let Some(last) = reply.ids.last() else { break };
        // Exclusive start of the next (older) page.
        end = format!("({}", last.id);
        scanned += reply.ids.len();
        for entry in &reply.ids {
            let Ok(decoded) = decode_entry(key, entry) else {
                continue;
            };
            if subject.concerns(&decoded.event) && out.len() < n {
                out.push(StreamEvent {
                    stream_id: decoded.stream_id,
                    id: decoded.id.to_string(),
                    event_type: decoded.event_type,
                    created: decoded.created,
                    detail: event_detail(&decoded.event),
                });
            }
        }
    }
    Ok(out)
}

/// Where an outbox row stands.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    Published,
    /// Waiting for the relay (Redis down, or just written).
    Pending,
    /// Failed repeatedly; later rows flow past it until it is re-driven.
    Parked,
}

/// An event as the outbox holds it.
#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct OutboxEvent {
    pub seq: i64,
    pub id: String,
    pub event_type: String,
    pub delivery: Delivery,
    pub created_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    pub parked_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub detail: String,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: uuid::Uuid,
    seq: i64,
    event_type: String,
    payload: Vec<u8>,
    created_at: DateTime<Utc>,
    published_at: Option<DateTime<Utc>>,
    parked_at: Option<DateTime<Utc>>,
    attempts: i32,
    last_error: Option<String>,
}

/// The newest `n` outbox rows about `subject` among those of `aggregate_ids`, newest
/// first. Rows are streamed from the server and decoded until `n` match.
pub async fn from_outbox(
    db: &PgPool,
    aggregate_ids: &[String],
    subject: &Subject,
    n: usize,
) -> Result<Vec<OutboxEvent>, sqlx::Error> {
    let mut rows = sqlx::query_as::<_, Row>(
        "SELECT id, seq, event_type, payload, created_at, published_at, parked_at, attempts, \
         last_error FROM outbox WHERE aggregate_id = ANY($1) ORDER BY seq DESC",
    )
    .bind(aggregate_ids)
    .fetch(db);
    let mut out = Vec::new();
    while out.len() < n {
        let Some(row) = rows.try_next().await? else {
            break;
        };
        let Ok(event) = Event::decode(row.payload.as_slice()) else {
            continue;
        };
        if !subject.concerns(&event) {
            continue;
        }
        let delivery = match (row.published_at, row.parked_at) {
            (Some(_), _) => Delivery::Published,
            (None, Some(_)) => Delivery::Parked,
            (None, None) => Delivery::Pending,
        };
        out.push(OutboxEvent {
            seq: row.seq,
            id: row.id.to_string(),
            event_type: row.event_type,
            delivery,
            created_at: row.created_at,
            published_at: row.published_at,
            parked_at: row.parked_at,
            attempts: row.attempts,
            last_error: row.last_error,
            detail: event_detail(&event),
        });
    }
    Ok(out)
}

//! Reading event streams: a consumer-group helper for downstream Rust services, and
//! [`read_all`] for tests.
//!
//! Delivery is at least once: the same event can arrive twice (with different stream
//! entry ids), so dedupe by [`DecodedEvent::id`].

use std::time::Duration;

use prost::Message;
use redis::AsyncConnectionConfig;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use uuid::Uuid;

use crate::customers;

/// Errors of the consumer helper; each names the stream and, for entries, the entry id.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// A Redis command failed.
    #[error("redis {command} on stream {key} failed: {source}")]
    Redis {
        /// The command, e.g. `XREADGROUP`.
        command: &'static str,
        /// The stream key.
        key: String,
        /// The Redis error.
        #[source]
        source: redis::RedisError,
    },
    /// An entry lacks a field, has a bad value, or a content type other than protobuf.
    #[error("stream {key} entry {entry}: {reason}")]
    Malformed {
        /// The stream key.
        key: String,
        /// The stream entry id (to `XACK` or inspect it).
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// The payload is not a decodable `Event`.
    #[error("stream {key} entry {entry}: payload does not decode as customers.Event: {source}")]
    Decode {
        /// The stream key.
        key: String,
        /// The stream entry id.
        entry: String,
        /// The protobuf error.
        #[source]
        source: prost::DecodeError,
    },
}

impl ConsumerError {
    /// The stream entry id the error is about, if it is about one entry.
    pub fn entry_id(&self) -> Option<&str> {
        match self {
            Self::Redis { .. } => None,
            Self::Malformed { entry, .. } | Self::Decode { entry, .. } => Some(entry),
        }
    }
}

/// A decoded stream entry.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEvent {
    /// The Redis stream entry id (e.g. `1700000000000-0`), for `XACK`.
    pub stream_id: String,
    /// The event id (the outbox row id); dedupe by it.
    pub id: Uuid,
    /// The event type's enum value name, e.g. `EventTypeCreated`.
    pub event_type: String,
    /// When the event was written, RFC 3339.
    pub created: String,
    /// The decoded payload.
    pub event: customers::Event,
}

/// Decodes one entry of stream `key` (the key is only used in error messages).
pub fn decode_entry(key: &str, entry: &StreamId) -> Result<DecodedEvent, ConsumerError> {
    let malformed = |reason: String| ConsumerError::Malformed {
        key: key.to_owned(),
        entry: entry.id.clone(),
        reason,
    };
    let field = |name: &str| -> Result<String, ConsumerError> {
        entry
            .get::<String>(name)
            .ok_or_else(|| malformed(format!("missing or non-string field `{name}`")))
    };
    let content_type = field("content-type")?;
    if content_type != crate::CONTENT_TYPE {
        return Err(malformed(format!(
            "content-type is {content_type:?}, expected {:?}",
            crate::CONTENT_TYPE
        )));
    }
    let raw_id = field("id")?;
    let id = Uuid::parse_str(&raw_id)
        .map_err(|e| malformed(format!("field `id` {raw_id:?} is not a UUID: {e}")))?;
    let payload = entry
        .get::<Vec<u8>>("payload")
        .ok_or_else(|| malformed("missing field `payload`".to_owned()))?;
    let event =
        customers::Event::decode(payload.as_slice()).map_err(|source| ConsumerError::Decode {
            key: key.to_owned(),
            entry: entry.id.clone(),
            source,
        })?;
    Ok(DecodedEvent {
        stream_id: entry.id.clone(),
        id,
        event_type: field("type")?,
        created: field("created")?,
        event,
    })
}

/// Every entry of stream `key` (`XRANGE key - +`), decoded, oldest first; fails on the
/// first entry that does not decode. Meant for tests and small streams.
pub async fn read_all(
    conn: &mut impl ConnectionLike,
    key: &str,
) -> Result<Vec<DecodedEvent>, ConsumerError> {
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .map_err(redis_err("XRANGE", key))?;
    reply.ids.iter().map(|e| decode_entry(key, e)).collect()
}

/// Creates consumer group `group` on stream `key` starting at the beginning (`0`),
/// creating the stream if missing (`MKSTREAM`); an existing group is left as it is.
pub async fn ensure_group(
    conn: &mut impl ConnectionLike,
    key: &str,
    group: &str,
) -> Result<(), ConsumerError> {
    let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(redis_err("XGROUP CREATE", key)(e)),
        _ => Ok(()),
    }
}

fn redis_err(command: &'static str, key: &str) -> impl FnOnce(redis::RedisError) -> ConsumerError {
    let key = key.to_owned();
    move |source| ConsumerError::Redis {
        command,
        key,
        source,
    }
}

/// Configuration of a [`Consumer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// The stream key, e.g. `events:customers` (see [`crate::stream_key`]).
    pub key: String,
    /// The consumer group (one per downstream service).
    pub group: String,
    /// This consumer's name within the group (one per replica).
    pub name: String,
    /// How long one [`Consumer::read`] waits for new entries. Default 2 s.
    pub block: Duration,
    /// At most this many entries per read. Default 100.
    pub count: usize,
}

impl ConsumerConfig {
    /// Defaults for consumer `name` of `group` on stream `key`.
    pub fn new(key: impl Into<String>, group: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            group: group.into(),
            name: name.into(),
            block: Duration::from_secs(2),
            count: 100,
        }
    }
}

/// A member of a consumer group, on a dedicated connection (a blocking `XREADGROUP`
/// would stall other commands sharing a multiplexed connection).
pub struct Consumer {
    conn: MultiplexedConnection,
    config: ConsumerConfig,
}

impl Consumer {
    /// Connects and creates the group if missing (see [`ensure_group`]).
    pub async fn connect(
        client: &redis::Client,
        config: ConsumerConfig,
    ) -> Result<Self, ConsumerError> {
        // The response must be allowed to take longer than the server-side BLOCK.
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(config.block + Duration::from_secs(5)));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&conn_config)
            .await
            .map_err(redis_err("connect", &config.key))?;
        ensure_group(&mut conn, &config.key, &config.group).await?;
        Ok(Self { conn, config })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// Reads new entries for this consumer (`XREADGROUP ... >`), waiting up to `block`.
    /// Each entry decodes separately: a bad one yields an `Err` naming its entry id
    /// (ack it to drop it) without hiding the good ones. Entries stay pending until
    /// [`Consumer::ack`].
    pub async fn read(
        &mut self,
    ) -> Result<Vec<Result<DecodedEvent, ConsumerError>>, ConsumerError> {
        let block_ms = u64::try_from(self.config.block.as_millis()).unwrap_or(u64::MAX);
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.config.name)
            .arg("COUNT")
            .arg(self.config.count.max(1))
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.config.key)
            .arg(">")
            .query_async(&mut self.conn)
            .await
            .map_err(redis_err("XREADGROUP", &self.config.key))?;
        let entries = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids);
        Ok(entries
            .map(|e| decode_entry(&self.config.key, &e))
            .collect())
    }

    /// Acknowledges processed entries by stream entry id; returns how many were pending.
    pub async fn ack(&mut self, stream_ids: &[String]) -> Result<usize, ConsumerError> {
        if stream_ids.is_empty() {
            return Ok(0);
        }
        redis::cmd("XACK")
            .arg(&self.config.key)
            .arg(&self.config.group)
            .arg(stream_ids)
            .query_async(&mut self.conn)
            .await
            .map_err(redis_err("XACK", &self.config.key))
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn entry(fields: &[(&str, Value)]) -> StreamId {
        StreamId {
            id: "1-0".into(),
            map: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            milliseconds_elapsed_from_delivery: None,
            delivered_count: None,
        }
    }

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    fn fields(content_type: &[u8], payload: &[u8]) -> Vec<(&'static str, Value)> {
        vec![
            ("id", bulk(b"0190b2a4-3c1e-7000-8000-000000000001")),
            ("type", bulk(b"EventTypeCreated")),
            ("content-type", bulk(content_type)),
            ("payload", bulk(payload)),
            ("created", bulk(b"2024-01-01T00:00:00.000000Z")),
        ]
    }

    #[test]
    fn decodes_a_well_formed_entry() {
        let decoded = decode_entry(
            "k",
            &entry(&fields(b"application/x-protobuf", &[0x08, 0x01])),
        );
        let decoded = decoded.expect("decodes");
        assert_eq!(decoded.stream_id, "1-0");
        assert_eq!(decoded.event_type, "EventTypeCreated");
        assert_eq!(decoded.event.r#type(), customers::EventType::Created);
        assert_eq!(decoded.created, "2024-01-01T00:00:00.000000Z");
    }

    #[test]
    fn rejects_wrong_content_type_naming_the_entry() {
        let err = decode_entry("k", &entry(&fields(b"application/json", b"{}")))
            .expect_err("wrong content type");
        assert_eq!(err.entry_id(), Some("1-0"));
        assert!(err.to_string().contains("stream k entry 1-0"), "{err}");
        assert!(err.to_string().contains("application/json"), "{err}");
    }

    #[test]
    fn rejects_undecodable_payload_naming_the_entry() {
        let err = decode_entry(
            "k",
            &entry(&fields(b"application/x-protobuf", &[0x0a, 0x05])),
        )
        .expect_err("truncated payload");
        assert!(matches!(err, ConsumerError::Decode { .. }), "{err}");
        assert!(err.to_string().contains("entry 1-0"), "{err}");
    }
}

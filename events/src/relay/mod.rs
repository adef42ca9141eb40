//! The outbox relay: publishes `outbox` rows to Redis Streams in `seq` order.
//!
//! Run one per schema, on the leader only ([`Relay::run`]). It drains at start, when
//! woken by `NOTIFY m3o_outbox` carrying its schema, and on a fallback timer. A drain
//! takes batches in a transaction, `XADD`s them (one `MULTI`/`EXEC` round trip per
//! batch), marks them published and commits. While Redis or Postgres is down it keeps
//! the rows unpublished, counts `attempts`, and retries with exponential backoff: no row
//! is skipped or reordered. Delivery is at least once (a crash between `XADD` and the
//! commit re-sends the batch); consumers dedupe by the entry's `id` field.
//!
//! Ordering across relays: each batch first takes a transaction-scoped advisory lock
//! for the schema (`pg_try_advisory_xact_lock`), and a relay that does not get it leaves
//! the drain to the holder. Plain `FOR UPDATE SKIP LOCKED` would let a second relay
//! (e.g. during a leader hand-over) publish later rows before earlier ones.

mod error;
mod stats;
mod wake;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use error::RelayError;
use error::pg;
pub use stats::RelayStats;
use wake::Backoff;
pub use wake::NOTIFY_CHANNEL;

/// Key (first half) of the advisory lock a relay holds while publishing a batch; the
/// second half is `hashtext(current_schema())`.
const LOCK_CLASS: i32 = 0x6d33_6f00; // "m3o\0"

/// Configuration of a [`Relay`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// The Postgres schema served. The pool's connections must have it as `search_path`
    /// (all SQL is unqualified); notifications for other schemas are ignored.
    pub schema: String,
    /// Stream key prefix: topic `t` goes to `<stream_prefix>t`. Default `events:`.
    pub stream_prefix: String,
    /// Approximate stream length bound (`XADD ... MAXLEN ~ N`). Default 100000.
    pub maxlen: usize,
    /// Rows per transaction and `XADD` round trip. Default 100.
    pub batch_size: u32,
    /// Drain at least this often even without notifications. Default 5 s.
    pub fallback_interval: Duration,
    /// First retry delay after a failure. Default 100 ms.
    pub backoff_min: Duration,
    /// Cap of the doubling retry delay. Default 10 s.
    pub backoff_max: Duration,
}

impl RelayConfig {
    /// Defaults for the relay of `schema`.
    pub fn new(schema: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            stream_prefix: crate::DEFAULT_STREAM_PREFIX.to_owned(),
            maxlen: 100_000,
            batch_size: 100,
            fallback_interval: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// An unpublished outbox row, as the relay reads it.
#[derive(Debug, sqlx::FromRow)]
struct Pending {
    id: Uuid,
    seq: i64,
    topic: String,
    event_type: String,
    payload: Vec<u8>,
    created_at: DateTime<Utc>,
}

/// Publishes one schema's outbox to Redis Streams. See the module documentation.
pub struct Relay {
    pool: PgPool,
    redis: ConnectionManager,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    /// The writer term whose epoch every batch checks first (see `fenced_by`).
    writer_epoch: Option<Arc<AtomicI64>>,
}

impl Relay {
    /// Creates a relay; it connects to Redis lazily (Redis may be down at start) and
    /// reconnects automatically. `pool`'s connections must use `config.schema` as
    /// `search_path`; the relay opens one more connection of its own for `LISTEN`.
    pub fn new(
        pool: PgPool,
        redis: redis::Client,
        config: RelayConfig,
    ) -> Result<Self, RelayError> {
        if config.batch_size == 0 {
            return Err(RelayError::Config("batch_size must be at least 1".into()));
        }
        if config.schema.is_empty() {
            return Err(RelayError::Config("schema must not be empty".into()));
        }
        let redis_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            // The relay has its own backoff; don't stack a long one inside a request.
            .set_number_of_retries(1);
        let redis = ConnectionManager::new_lazy_with_config(redis, redis_config)
            .map_err(RelayError::RedisSetup)?;
        Ok(Self {
            pool,
            redis,
            config,
            stats: Arc::new(RelayStats::default()),
            writer_epoch: None,
        })
    }

    /// Publishes only while `epoch` is the schema's current writer term: each batch's
    /// transaction begins with `writer_fence_check` (migration 0005), so a replaced
    /// operator neither sends nor marks a row, and a newer term waits for (or
    /// terminates) a batch in flight.
    pub fn fenced_by(mut self, epoch: Arc<AtomicI64>) -> Self {
        self.writer_epoch = Some(epoch);
        self
    }

    /// The relay's counters, for metrics.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// The configuration in use.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Publishes up to `batch_size` unpublished rows in `seq` order, in one transaction,
    /// and returns how many it published (0 if none are pending or another relay holds
    /// the schema's lock). On a Redis error the rows' `attempts` are incremented and
    /// committed, and they stay unpublished.
    pub async fn publish_batch(&mut self) -> Result<usize, RelayError> {
        let mut tx = self.pool.begin().await.map_err(pg("BEGIN"))?;
        if let Some(epoch) = &self.writer_epoch {
            sqlx::query("SELECT writer_fence_check($1)")
                .bind(epoch.load(Ordering::SeqCst))
                .execute(&mut *tx)
                .await
                .map_err(pg("checking the writer fence"))?;
        }
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema()))")
                .bind(LOCK_CLASS)
                .fetch_one(&mut *tx)
                .await
                .map_err(pg("taking the relay lock"))?;
        if !locked {
            return Ok(0);
        }
        let rows: Vec<Pending> = sqlx::query_as(
            "SELECT id, seq, topic, event_type, payload, created_at FROM outbox \
             WHERE published_at IS NULL ORDER BY seq LIMIT $1 FOR UPDATE",
        )
        .bind(i64::from(self.config.batch_size))
        .fetch_all(&mut *tx)
        .await
        .map_err(pg("selecting unpublished outbox rows"))?;
        let Some(first) = rows.first() else {
            return Ok(0);
        };
        let first_seq = first.seq;
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();

        let published = self
            .xadd_pipeline(&rows)
            .query_async::<Vec<String>>(&mut self.redis)
            .await;
        if let Err(source) = published {
            // Count the attempt and commit it: the rows stay unpublished, in order.
            let counted =
                sqlx::query("UPDATE outbox SET attempts = attempts + 1 WHERE id = ANY($1)")
                    .bind(&ids)
                    .execute(&mut *tx)
                    .await;
            let committed = match counted {
                Ok(_) => tx.commit().await,
                Err(error) => Err(error),
            };
            if let Err(error) = committed {
                tracing::debug!(%error, "counting failed outbox publish attempts failed");
            }
            return Err(RelayError::Publish {
                count: rows.len(),
                first_seq,
                source,
            });
        }
        sqlx::query(
            "UPDATE outbox SET published_at = now(), attempts = attempts + 1 WHERE id = ANY($1)",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .map_err(pg("marking outbox rows published"))?;
        tx.commit()
            .await
            .map_err(pg("committing published outbox rows"))?;
        self.stats.record_published(rows.len());
        tracing::debug!(count = rows.len(), first_seq, "published outbox events");
        Ok(rows.len())
    }

    /// Publishes batches until none is pending (or a batch is short); returns the count.
    pub async fn drain(&mut self) -> Result<usize, RelayError> {
        self.drain_until(&CancellationToken::new()).await
    }

    async fn drain_until(&mut self, shutdown: &CancellationToken) -> Result<usize, RelayError> {
        let full = usize::try_from(self.config.batch_size).unwrap_or(usize::MAX);
        let mut total = 0;
        while !shutdown.is_cancelled() {
            let n = self.publish_batch().await?;
            total += n;
            if n < full {
                break;
            }
        }
        Ok(total)
    }

    /// One atomic `MULTI`/`EXEC` round trip with an `XADD` per row, in `seq` order.
    fn xadd_pipeline(&self, rows: &[Pending]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for row in rows {
            pipe.cmd("XADD")
                .arg(crate::stream_key(&self.config.stream_prefix, &row.topic))
                .arg("MAXLEN")
                .arg("~")
                .arg(self.config.maxlen)
                .arg("*")
                .arg("id")
                .arg(row.id.to_string())
                .arg("type")
                .arg(&row.event_type)
                .arg("content-type")
                .arg(crate::CONTENT_TYPE)
                .arg("payload")
                .arg(&row.payload[..])
                .arg("created")
                .arg(row.created_at.to_rfc3339_opts(SecondsFormat::Micros, true));
        }
        pipe
    }

    /// Runs until `shutdown` is cancelled: drains at start, on each `NOTIFY` for the
    /// schema, and every `fallback_interval`; retries failures with backoff. Logs a
    /// warning once per outage and an info line on recovery; see [`Relay::stats`].
    ///
    /// Shutdown is cooperative: cancellation is observed between batches, so a batch in
    /// flight completes (or fails) first. Spawn it with `tokio::spawn(relay.run(token))`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let listener_stop = shutdown.child_token();
        let listener = tokio::spawn(wake::listen(
            self.pool.connect_options().as_ref().clone(),
            self.config.schema.clone(),
            Arc::clone(&wake),
            listener_stop.clone(),
            Backoff::new(self.config.backoff_min, self.config.backoff_max),
        ));
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max);
        let schema = self.config.schema.clone();
        tracing::info!(schema, prefix = %self.config.stream_prefix, "outbox relay started");
        self.check_search_path().await;
        while !shutdown.is_cancelled() {
            match self.drain_until(&shutdown).await {
                Ok(count) => {
                    backoff.reset();
                    if self.stats.record_success() {
                        tracing::info!(schema, count, "outbox relay recovered; publishing again");
                    }
                }
                Err(error) => {
                    if self.stats.record_failure(&error) {
                        tracing::warn!(schema, %error, "outbox relay cannot publish; retrying with backoff");
                    } else {
                        tracing::debug!(schema, %error, "outbox relay retry failed");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff.next_delay()) => continue,
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => tracing::trace!(schema, "outbox relay woken by NOTIFY"),
                _ = tokio::time::sleep(self.config.fallback_interval) => {
                    tracing::trace!(schema, "outbox relay woken by the fallback timer");
                }
            }
        }
        listener_stop.cancel();
        if let Err(error) = listener.await {
            tracing::warn!(%error, "outbox LISTEN task ended abnormally");
        }
        tracing::info!(schema, "outbox relay stopped");
    }
}

impl Relay {
    /// Warns when the pool's schema is not the configured one: NOTIFYs would then be
    /// ignored and only the fallback timer would publish.
    async fn check_search_path(&self) {
        let current: Result<Option<String>, _> = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&self.pool)
            .await;
        if let Ok(current) = current
            && current.as_deref() != Some(self.config.schema.as_str())
        {
            tracing::warn!(
                schema = self.config.schema,
                current_schema = current.as_deref().unwrap_or("(none)"),
                "outbox relay: the pool's search_path does not select the configured schema"
            );
        }
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

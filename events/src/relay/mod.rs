//! The outbox relay: publishes `outbox` rows to Redis Streams in `seq` order.
//!
//! Run one per schema, on the leader only ([`Relay::run`]). It drains at start, when
//! woken by `NOTIFY m3o_outbox` carrying its schema, and on a fallback timer. A drain
//! takes batches (bounded by rows and by payload bytes, so one round trip stays well
//! inside the Redis response timeout) in a transaction, `XADD`s them (one
//! `MULTI`/`EXEC` round trip per batch), marks them published and commits. Delivery is
//! at least once (a crash between `XADD` and the commit re-sends the batch); consumers
//! dedupe by the entry's `id` field.
//!
//! Failures are isolated (see [`publish`]): while Redis does not answer, rows stay
//! unpublished and in order, no attempt is counted, and the relay probes Redis with
//! `PING` so that it drains again as soon as Redis answers. A row that Redis answers
//! with a refusal (`WRONGTYPE`, `NOPERM`, ...) has its `attempts` counted and
//! `last_error` set, is retried with backoff, and after `max_attempts` refusals is
//! *parked* (`parked_at`): later rows flow past it. Published rows are deleted after
//! `retention`.
//!
//! Ordering across relays: each batch first takes a transaction-scoped advisory lock
//! for the schema (`pg_try_advisory_xact_lock`), and a relay that does not get it leaves
//! the drain to the holder. Plain `FOR UPDATE SKIP LOCKED` would let a second relay
//! (e.g. during a leader hand-over) publish later rows before earlier ones.

mod error;
mod housekeeping;
mod plan;
mod publish;
mod stats;
mod wake;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use error::RelayError;
pub use publish::{BatchOutcome, ParkedEvent, pause_relays, xadd};
pub use stats::{GroupLag, RelayStats};
use wake::Backoff;
pub use wake::NOTIFY_CHANNEL;

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
    /// Rows per transaction and `XADD` round trip, at most. Default 100.
    pub batch_size: u32,
    /// Payload bytes per batch, at most (a larger row goes alone). Default 1 MiB.
    pub batch_max_bytes: u64,
    /// Refusals of a row by Redis before it is parked. Default 10.
    pub max_attempts: u32,
    /// Published rows older than this are deleted. Default 72 h.
    pub retention: Duration,
    /// How often expired published rows are deleted. Default 1 min.
    pub retention_interval: Duration,
    /// Rows deleted per retention statement (bounded, so no long lock). Default 1000.
    pub retention_batch: u32,
    /// How often consumer-group lag is read (`XINFO GROUPS`). Default 15 s.
    pub lag_interval: Duration,
    /// Drain at least this often even without notifications. Default 5 s.
    pub fallback_interval: Duration,
    /// A drain woken by `NOTIFY` starts at least this long after the previous drain
    /// ended. An event after a quiet spell is published at once; a stream of commits
    /// (a bulk apply) is published in batches, not one transaction per row. Default 25 ms.
    pub drain_spacing: Duration,
    /// First retry delay after a failure. Default 100 ms.
    pub backoff_min: Duration,
    /// Cap of the doubling retry delay. Default 10 s.
    pub backoff_max: Duration,
    /// While backing off from an unreachable backend, how often it is probed (`PING`,
    /// `SELECT 1`), so that draining resumes within this long of its return. Default 250 ms.
    pub probe_interval: Duration,
}

impl RelayConfig {
    /// Defaults for the relay of `schema`.
    pub fn new(schema: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            stream_prefix: crate::DEFAULT_STREAM_PREFIX.to_owned(),
            maxlen: 100_000,
            batch_size: 100,
            batch_max_bytes: 1024 * 1024,
            max_attempts: 10,
            retention: Duration::from_secs(72 * 3600),
            retention_interval: Duration::from_secs(60),
            retention_batch: 1000,
            lag_interval: Duration::from_secs(15),
            fallback_interval: Duration::from_secs(5),
            drain_spacing: Duration::from_millis(25),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            probe_interval: Duration::from_millis(250),
        }
    }
}

/// Publishes one schema's outbox to Redis Streams. See the module documentation.
pub struct Relay {
    pool: PgPool,
    redis: ConnectionManager,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    /// Aggregates with a refused, not yet parked row, and when to try them again. Their
    /// rows are left alone until then, so they keep their order (in memory: a new
    /// leader simply tries them at once; `attempts` is in the row).
    cooling: HashMap<String, Instant>,
    parked_tx: Option<mpsc::Sender<ParkedEvent>>,
    /// The writer fence and term every batch checks first (see `fenced_by`).
    writer_epoch: Option<(String, Arc<AtomicI64>)>,
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
        if config.max_attempts == 0 {
            return Err(RelayError::Config("max_attempts must be at least 1".into()));
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
            cooling: HashMap::new(),
            parked_tx: None,
            writer_epoch: None,
        })
    }

    /// Publishes only while `epoch` is the schema's current writer term: each batch's
    /// transaction begins with `writer_fence_check` (migration 0005), so a replaced
    /// operator neither sends nor marks a row, and a newer term waits for (or
    /// terminates) a batch in flight.
    pub fn fenced_by(mut self, fence: &str, epoch: Arc<AtomicI64>) -> Self {
        self.writer_epoch = Some((fence.to_owned(), epoch));
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

    /// Returns a receiver of every row the relay parks from now on (for Kubernetes
    /// Events). The relay never waits for it: when `capacity` notifications are
    /// unread, further ones are dropped (each is logged by the relay anyway).
    pub fn parked_events(&mut self, capacity: usize) -> mpsc::Receiver<ParkedEvent> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.parked_tx = Some(tx);
        rx
    }

    /// Deletes published rows older than `retention` (what [`Relay::run`] does every
    /// `retention_interval`); returns how many.
    pub async fn delete_expired(&self) -> u64 {
        housekeeping::delete_expired(&self.pool, &self.config, &CancellationToken::new()).await
    }

    /// Publishes batches until none is pending (or a batch is short); returns how many
    /// rows were published.
    pub async fn drain(&mut self) -> Result<usize, RelayError> {
        self.drain_until(&CancellationToken::new()).await
    }

    async fn drain_until(&mut self, shutdown: &CancellationToken) -> Result<usize, RelayError> {
        let mut total = 0;
        while !shutdown.is_cancelled() {
            let outcome = self.publish_batch().await?;
            total += outcome.published;
            if !outcome.more {
                break;
            }
        }
        Ok(total)
    }

    /// Runs until `shutdown` is cancelled: drains at start, on each `NOTIFY` for the
    /// schema, every `fallback_interval`, and when a refused row's retry is due; deletes
    /// expired published rows; reads consumer-group lag. After a failure it backs off,
    /// probing the failed backend so that it resumes as soon as it answers. Logs a
    /// warning once per outage and an info line on recovery; see [`Relay::stats`].
    ///
    /// Shutdown is cooperative: cancellation is observed between batches, so a batch in
    /// flight completes (or fails) first. Spawn it with `tokio::spawn(relay.run(token))`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let tasks_stop = shutdown.child_token();
        let listener = tokio::spawn(wake::listen(
            self.pool.connect_options().as_ref().clone(),
            self.config.schema.clone(),
            Arc::clone(&wake),
            tasks_stop.clone(),
            Backoff::new(self.config.backoff_min, self.config.backoff_max),
        ));
        let lag = tokio::spawn(housekeeping::watch_lag(
            self.redis.clone(),
            self.config.stream_prefix.clone(),
            self.config.lag_interval,
            Arc::clone(&self.stats),
            tasks_stop.clone(),
        ));
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max);
        let mut next_retention = Instant::now();
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
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = self.wait_for_recovery(&error, delay) => continue,
                    }
                }
            }
            let drained_at = Instant::now();
            if Instant::now() >= next_retention {
                housekeeping::delete_expired(&self.pool, &self.config, &shutdown).await;
                next_retention = Instant::now() + self.config.retention_interval;
            }
            let mut wake_at = next_retention.min(Instant::now() + self.config.fallback_interval);
            if let Some(due) = self.cooling.values().min() {
                wake_at = wake_at.min(*due);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => {
                    tracing::trace!(schema, "outbox relay woken by NOTIFY");
                    // More commits may follow this one: they join its batch.
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep_until(drained_at + self.config.drain_spacing) => {}
                    }
                }
                _ = tokio::time::sleep_until(wake_at) => {
                    tracing::trace!(schema, "outbox relay woken by a timer");
                }
            }
        }
        tasks_stop.cancel();
        for (task, result) in [("LISTEN", listener.await), ("lag", lag.await)] {
            if let Err(error) = result {
                tracing::warn!(%error, task, "outbox relay task ended abnormally");
            }
        }
        tracing::info!(schema, "outbox relay stopped");
    }

    /// Waits out `delay` after `error`, returning early once the failed backend answers
    /// a probe again (Redis `PING`, Postgres `SELECT 1`). A Redis that answers but
    /// refuses writes (out of memory, loading) is not probed: the full delay applies.
    async fn wait_for_recovery(&mut self, error: &RelayError, delay: Duration) {
        let deadline = Instant::now() + delay;
        let probe_redis = match error.probe() {
            Some(error::Backend::Redis) => true,
            Some(error::Backend::Postgres) => false,
            None => {
                tokio::time::sleep_until(deadline).await;
                return;
            }
        };
        while Instant::now() < deadline {
            tokio::time::sleep(self.config.probe_interval.min(delay)).await;
            let answered = if probe_redis {
                redis::cmd("PING")
                    .query_async::<String>(&mut self.redis)
                    .await
                    .is_ok()
            } else {
                sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
            };
            if answered {
                tracing::debug!(
                    schema = self.config.schema,
                    "outbox relay: backend answers again"
                );
                return;
            }
        }
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

//! Errors of the relay.

/// Errors of one relay step. [`super::Relay::run`] logs them and retries; they surface to
/// callers only through [`super::Relay::publish_batch`] and [`super::Relay::drain`].
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The configuration cannot work.
    #[error("invalid outbox relay configuration: {0}")]
    Config(String),
    /// The Redis connection manager could not be created.
    #[error("creating the Redis connection manager for the outbox relay failed: {0}")]
    RedisSetup(#[source] redis::RedisError),
    /// A Postgres statement of the relay failed.
    #[error("outbox relay: {what} failed: {source}")]
    Postgres {
        /// Which step failed.
        what: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// `XADD` of a batch failed; its rows stay unpublished and are retried.
    #[error(
        "outbox relay: XADD of {count} events (from seq {first_seq}) to Redis failed: {source}"
    )]
    Publish {
        /// Rows in the batch.
        count: usize,
        /// `seq` of the first row of the batch.
        first_seq: i64,
        /// The Redis error.
        #[source]
        source: redis::RedisError,
    },
}

/// Maps a database error of step `what` into a [`RelayError::Postgres`].
pub(crate) fn pg(what: &'static str) -> impl FnOnce(sqlx::Error) -> RelayError {
    move |source| RelayError::Postgres { what, source }
}

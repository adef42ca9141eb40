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
    /// Redis did not take a batch (unreachable, or not accepting writes); its rows stay
    /// unpublished, in order, and are retried. Refusals of single rows are not errors:
    /// they are counted on the row (see [`super::BatchOutcome`]).
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

/// A backend the relay can probe while backing off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Redis,
    Postgres,
}

impl RelayError {
    /// Which backend to probe before retrying: one that did not answer at all. `None`
    /// when the failure came with an answer (e.g. Redis out of memory) or is permanent.
    pub(crate) fn probe(&self) -> Option<Backend> {
        match self {
            Self::Publish { source, .. } if !super::plan::answered(source) => Some(Backend::Redis),
            Self::Postgres { .. } => Some(Backend::Postgres),
            _ => None,
        }
    }
}

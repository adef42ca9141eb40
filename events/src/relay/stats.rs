//! Counters of the relay, read by the operator's metrics and probes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counters of a [`super::Relay`], shared as `Arc<RelayStats>` (see
/// [`super::Relay::stats`]). All reads are lock free except [`RelayStats::last_error`].
#[derive(Debug, Default)]
pub struct RelayStats {
    published_total: AtomicU64,
    failures_total: AtomicU64,
    parked_total: AtomicU64,
    failing: AtomicBool,
    last_error: Mutex<Option<String>>,
    group_lags: Mutex<Vec<GroupLag>>,
}

/// Where one consumer group of one stream stands (from `XINFO GROUPS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLag {
    /// The stream key.
    pub stream: String,
    /// The consumer group.
    pub group: String,
    /// Entries not yet delivered to the group; `None` when Redis cannot tell (entries
    /// deleted from the middle of the stream) or is older than 7.0.
    pub lag: Option<u64>,
    /// Entries delivered to the group's consumers and not yet acknowledged.
    pub pending: u64,
}

impl RelayStats {
    /// Events published to Redis since start (re-sends after a crash count again).
    pub fn published_total(&self) -> u64 {
        self.published_total.load(Ordering::Relaxed)
    }

    /// Failed publish attempts (batches) since start, Redis and Postgres failures alike.
    pub fn failures_total(&self) -> u64 {
        self.failures_total.load(Ordering::Relaxed)
    }

    /// Rows parked since start.
    pub fn parked_total(&self) -> u64 {
        self.parked_total.load(Ordering::Relaxed)
    }

    /// The consumer groups of every topic's stream, as last read (empty until read).
    pub fn group_lags(&self) -> Vec<GroupLag> {
        self.group_lags
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_group_lags(&self, lags: Vec<GroupLag>) {
        *self
            .group_lags
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = lags;
    }

    pub(crate) fn record_parked(&self, n: usize) {
        self.parked_total
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Whether the most recent attempt failed (the relay is retrying with backoff).
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// The message of the most recent failure, kept after recovery; `None` if none yet.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn record_published(&self, n: usize) {
        self.published_total
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Records a failure; returns true if it starts an outage (the previous attempt
    /// succeeded), so the caller logs once per outage.
    pub(crate) fn record_failure(&self, error: &dyn std::error::Error) -> bool {
        self.failures_total.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error.to_string());
        !self.failing.swap(true, Ordering::Relaxed)
    }

    /// Records a success; returns true if it ends an outage.
    pub(crate) fn record_success(&self) -> bool {
        self.failing.swap(false, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_and_recovery_are_reported_once() {
        let stats = RelayStats::default();
        let err = std::io::Error::other("redis down");
        assert!(stats.record_failure(&err));
        assert!(!stats.record_failure(&err));
        assert!(stats.is_failing());
        assert_eq!(stats.failures_total(), 2);
        assert_eq!(stats.last_error().as_deref(), Some("redis down"));
        assert!(stats.record_success());
        assert!(!stats.record_success());
        stats.record_published(3);
        assert_eq!(stats.published_total(), 3);
        assert!(!stats.is_failing());
    }
}

//! Pure decisions of the relay (no I/O): how big a batch is, whose fault a Redis error
//! is, when a refused row is tried again and when it is parked.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

/// How many of the candidate rows (their payload sizes, in `seq` order) form the next
/// batch: at most `max_rows`, and at most `max_bytes` of payload in total, so that one
/// `XADD` round trip stays well inside the Redis response timeout. A row larger than
/// `max_bytes` goes alone (never zero rows while there are candidates).
pub(crate) fn batch_len(sizes: &[u64], max_rows: usize, max_bytes: u64) -> usize {
    let mut total: u64 = 0;
    let mut n = 0;
    for &size in sizes.iter().take(max_rows.max(1)) {
        total = total.saturating_add(size);
        if n > 0 && total > max_bytes {
            break;
        }
        n += 1;
    }
    n
}

/// Whose fault a failed `XADD` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blame {
    /// Redis did not answer, or answered that it cannot take writes now (loading, out of
    /// memory, read-only replica, ...). Nothing is wrong with the rows: keep them in
    /// order, count no attempt, and retry once Redis answers.
    Unavailable,
    /// Redis answered and refused this command (`WRONGTYPE`, `NOPERM`, `ERR ...`): the
    /// row's own attempt failed; it counts toward parking.
    Refused,
}

/// Error codes by which a Redis server says it cannot take writes at the moment.
const UNAVAILABLE_CODES: &[&str] = &["OOM", "BUSY", "MISCONF", "NOREPLICAS", "LOADING"];

/// Classifies a Redis error (see [`Blame`]).
pub(crate) fn blame(error: &RedisError) -> Blame {
    match error.kind() {
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly,
        ) => Blame::Unavailable,
        ErrorKind::Server(ServerErrorKind::ExecAbort) => Blame::Refused,
        ErrorKind::Server(_) | ErrorKind::Extension => {
            if error.code().is_some_and(|c| UNAVAILABLE_CODES.contains(&c)) {
                Blame::Unavailable
            } else {
                Blame::Refused
            }
        }
        // I/O, timeouts, dropped connections, parse and client errors.
        _ => Blame::Unavailable,
    }
}

/// Whether Redis answered (with an error reply) rather than not at all.
pub(crate) fn answered(error: &RedisError) -> bool {
    matches!(error.kind(), ErrorKind::Server(_) | ErrorKind::Extension)
}

/// How long a refused row (and its aggregate's later rows) waits before the next try,
/// after `attempts` refusals: `min` doubling per attempt, capped at `max`.
pub(crate) fn retry_delay(attempts: i32, min: Duration, max: Duration) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(0);
    min.saturating_mul(1u32 << doublings).min(max.max(min))
}

/// Whether a row refused `attempts` times is parked.
pub(crate) fn park(attempts: i32, max_attempts: u32) -> bool {
    i64::from(attempts) >= i64::from(max_attempts.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_bounded_by_rows_and_bytes() {
        assert_eq!(batch_len(&[], 10, 100), 0);
        assert_eq!(batch_len(&[10; 20], 10, 1000), 10, "row bound");
        assert_eq!(batch_len(&[40, 40, 40], 10, 100), 2, "byte bound");
        assert_eq!(
            batch_len(&[50, 50, 1], 10, 100),
            2,
            "exactly the bound fits"
        );
        assert_eq!(batch_len(&[500, 1], 10, 100), 1, "a huge row goes alone");
        assert_eq!(
            batch_len(&[1, 500], 10, 100),
            1,
            "a huge row waits for its own batch"
        );
        assert_eq!(batch_len(&[5], 0, 0), 1, "never stuck at zero");
    }

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let delays: Vec<u128> = (0..7)
            .map(|a| retry_delay(a, min, max).as_millis())
            .collect();
        assert_eq!(delays, [100, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(retry_delay(i32::MAX, min, max), max);
    }

    #[test]
    fn parking_after_max_attempts() {
        assert!(!park(2, 3));
        assert!(park(3, 3));
        assert!(park(1, 0), "a zero bound parks at the first refusal");
    }

    #[test]
    fn outages_are_not_the_rows_fault() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(blame(&io), Blame::Unavailable);
        let timeout = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(blame(&timeout), Blame::Unavailable);
        assert!(!answered(&io) && !answered(&timeout));
    }
}

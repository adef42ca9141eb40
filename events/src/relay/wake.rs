//! Wake-ups of the relay: `LISTEN m3o_outbox` on a dedicated connection, and backoff.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The channel the `outbox_notify` trigger notifies; the payload is the table's schema.
pub const NOTIFY_CHANNEL: &str = "m3o_outbox";

/// Exponential backoff: `min`, doubling on each failure, capped at `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The delay to wait now; the following one is twice as long (up to `max`).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Listens on [`NOTIFY_CHANNEL`] with its own one-connection pool (so it never takes a
/// connection from the relay's pool) and calls `wake.notify_one()` on each notification
/// whose payload is `schema`, and after each (re)connect, since notifications sent while
/// disconnected are lost. Reconnects with backoff until `shutdown` is cancelled.
pub(crate) async fn listen(
    options: PgConnectOptions,
    schema: String,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    mut backoff: Backoff,
) {
    // Visible in pg_stat_activity (at most 63 bytes are kept).
    let name: String = format!("m3o-outbox-listener:{schema}")
        .chars()
        .take(63)
        .collect();
    let options = options.application_name(&name);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with(options);
    let mut listener: Option<PgListener> = None;
    let mut failing = false;
    while !shutdown.is_cancelled() {
        let result = match listener.as_mut() {
            Some(l) => tokio::select! {
                _ = shutdown.cancelled() => break,
                r = l.try_recv() => r.map(|n| n.map(|n| n.payload() == schema)),
            },
            None => {
                let subscribed = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = subscribe(&pool) => r,
                };
                subscribed.map(|l| {
                    listener = Some(l);
                    None
                })
            }
        };
        match result {
            // A notification for our schema.
            Ok(Some(true)) => wake.notify_one(),
            // Another schema's relay is meant.
            Ok(Some(false)) => {}
            // Freshly subscribed, or the connection was lost and re-established: catch up.
            Ok(None) => {
                tracing::debug!(schema, "outbox LISTEN connection established");
                if std::mem::take(&mut failing) {
                    tracing::info!(schema, "outbox LISTEN connection restored");
                }
                backoff.reset();
                wake.notify_one();
            }
            Err(error) => {
                listener = None;
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(
                        schema, %error,
                        "outbox LISTEN connection failed; relying on the fallback timer while reconnecting"
                    );
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
    drop(listener);
    pool.close().await;
}

async fn subscribe(pool: &sqlx::PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // The pool is ours alone; a close event only happens at shutdown.
    listener.ignore_pool_close_event(true);
    listener.listen(NOTIFY_CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn backoff_tolerates_nonsense_bounds() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(b.next_delay(), Duration::from_millis(1));
        assert_eq!(b.next_delay(), Duration::from_millis(1));
    }
}

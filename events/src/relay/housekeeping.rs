//! The relay's side work: deleting expired published rows, reading consumer-group lag.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::streams::StreamInfoGroupsReply;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{RelayConfig, RelayStats};

/// Deletes published rows older than `config.retention`, `retention_batch` rows per
/// statement (short transactions, no long lock), until none is left or `shutdown`.
/// Unpublished and parked rows are never deleted. Failures are logged; the next round
/// tries again.
pub(crate) async fn delete_expired(
    pool: &PgPool,
    config: &RelayConfig,
    shutdown: &CancellationToken,
) -> u64 {
    let mut total = 0;
    while !shutdown.is_cancelled() {
        let deleted = sqlx::query(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox \
             WHERE published_at < now() - make_interval(secs => $1) LIMIT $2)",
        )
        .bind(config.retention.as_secs_f64())
        .bind(i64::from(config.retention_batch.max(1)))
        .execute(pool)
        .await;
        match deleted {
            Ok(done) => {
                total += done.rows_affected();
                if done.rows_affected() < u64::from(config.retention_batch.max(1)) {
                    break;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "outbox retention: deleting published rows failed");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(
            schema = config.schema,
            deleted = total,
            "outbox retention: published rows deleted"
        );
    }
    total
}

/// Every `interval`, reads `XINFO GROUPS` of each topic's stream into `stats` (see
/// [`RelayStats::group_lags`]), until `shutdown`.
pub(crate) async fn watch_lag(
    mut redis: ConnectionManager,
    prefix: String,
    interval: Duration,
    stats: Arc<RelayStats>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let mut lags = Vec::new();
        let mut complete = true;
        for topic in crate::TOPICS {
            let stream = crate::stream_key(&prefix, topic);
            let reply = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&stream)
                .query_async::<StreamInfoGroupsReply>(&mut redis)
                .await;
            match reply {
                Ok(reply) => lags.extend(reply.groups.into_iter().map(|g| super::GroupLag {
                    stream: stream.clone(),
                    group: g.name,
                    lag: g.lag.map(|n| u64::try_from(n).unwrap_or(u64::MAX)),
                    pending: u64::try_from(g.pending).unwrap_or(u64::MAX),
                })),
                // Redis answered: no such stream yet (or not a stream): no groups.
                Err(error) if super::plan::answered(&error) => {}
                Err(error) => {
                    tracing::debug!(%error, stream, "reading consumer-group lag failed");
                    complete = false;
                }
            }
        }
        // Keep the last known figures while Redis is down rather than dropping series.
        if complete {
            stats.set_group_lags(lags);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

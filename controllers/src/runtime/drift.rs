//! Drift correction: the operator owns its etcd prefix. A full resync at start and
//! every resync interval, and a watch in between, restore hand edits and deletions
//! and remove keys no record owns. Our own writes are recognised by revision.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use kube::runtime::events::EventType as K8sEventType;
use tokio_util::sync::CancellationToken;

use uuid::Uuid;

use crate::platform::desired::{self, KeyOwner};
use crate::platform::entry::entry_verdict;
use crate::platform::scan::FleetScan;
use crate::report::error::Error;
use crate::runtime::context::Context;
use crate::store::api_keys;

const RETRY: Duration = Duration::from_secs(2);
/// Keys read at once from each side by the full resync.
const RESYNC_PAGE: i64 = 500;

/// Keeps the prefix equal to what Postgres says until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let pass = async {
            // Deadlines crossed after this are the clock's (the resync saw the rest).
            let compared_at = chrono::Utc::now();
            // A divergence of the writer term found before this resync is healed by it.
            let divergence = ctx.platform.divergence();
            let healing = divergence.pending_number();
            let revision = resync(&ctx).await?;
            // Healed once etcd records the term again (a refusal waiting for a human,
            // such as a fence key holding no term, is not healed by a resync that had
            // nothing to write).
            if let Some(number) = healing
                && ctx.platform.term_recorded().await?
            {
                divergence.healed(number);
            }
            watch(&ctx, revision, compared_at).await
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            result = pass => {
                if let Err(err) = result {
                    // A fenced write was said once where it was refused (the writer
                    // fence, or etcd's: another database, a fence key holding no term).
                    if err.is_fenced() {
                        tracing::debug!(%err, "etcd drift watcher refused by the writer fence; resyncing");
                    } else {
                        tracing::warn!(%err, "etcd drift watcher interrupted; resyncing");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
        }
    }
}

/// Compares every key under the prefix with Postgres and fixes differences, a page at
/// a time ([`FleetScan`]: memory independent of the fleet). Returns the etcd revision
/// of its first page, for the watch to start after.
pub async fn resync(ctx: &Context) -> Result<i64, Error> {
    ctx.metrics.config_resyncs.inc();
    let mut scan = FleetScan::new(&ctx.db, &ctx.platform, RESYNC_PAGE);
    while let Some(keys) = scan.next_keys().await? {
        for (relative, wanted, actual) in keys {
            if entry_verdict(wanted.as_ref().map(|e| &e.value), actual.as_deref()).is_drift() {
                repair(ctx, &relative).await?;
            }
        }
    }
    scan.revision()
        .ok_or_else(|| Error::Internal("the etcd scan read no page".into()))
}

/// Watches the prefix from `after + 1` until the stream ends, the interval for a full
/// resync elapses, or an error occurs. Meanwhile converges, at each key's expiry or end
/// of grace, only the customers whose keys crossed it, so an entry stops being active
/// on time even if its reconcile is late, at a cost independent of the fleet.
async fn watch(
    ctx: &Context,
    after: i64,
    compared_at: chrono::DateTime<chrono::Utc>,
) -> Result<(), Error> {
    let prefix = format!("{}/", ctx.platform.prefix());
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(after + 1);
    let mut stream = ctx
        .platform
        .client()
        .watch(prefix.clone(), Some(options))
        .await?;
    let resync = tokio::time::sleep(ctx.settings.resync_interval);
    tokio::pin!(resync);
    let mut clock = Clock::start(ctx, compared_at).await?;
    let divergence = ctx.platform.divergence();
    loop {
        let message = tokio::select! {
            _ = &mut resync => return Ok(()),
            // The term was re-established in etcd: converge the whole prefix now.
            _ = divergence.heal_requested() => return Ok(()),
            _ = tokio::time::sleep_until(clock.wake) => {
                clock.converge_crossed(ctx).await?;
                continue;
            }
            message = stream.message() => message?,
        };
        let Some(response) = message else {
            return Ok(());
        };
        // History up to the revision it started from was compacted (a full resync
        // whose repairs outlasted etcd's retention): compare again from now.
        if response.compact_revision() > 0 {
            return Err(Error::Transient(format!(
                "etcd compacted the watch's start revision {} (compacted up to {}); resyncing",
                after + 1,
                response.compact_revision()
            )));
        }
        if response.canceled() {
            return Err(Error::Transient(format!(
                "etcd watch canceled: {}",
                response.cancel_reason()
            )));
        }
        // A write (ours included) may bring a nearer deadline: a key just issued.
        clock.look_again_soon(ctx).await?;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            if ctx.platform.is_own_write(kv.mod_revision()) {
                continue;
            }
            let Some(relative) = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(&prefix))
                .map(str::to_owned)
            else {
                continue;
            };
            if desired::is_gateway_report(&relative) {
                continue;
            }
            let current = (event.event_type() == EventType::Put).then(|| kv.value().to_vec());
            correct(ctx, &relative, current.as_deref()).await?;
        }
    }
}

/// How often the next deadline is looked up again at most while etcd changes.
const CLOCK_LOOKUP: Duration = Duration::from_secs(1);
/// Past a deadline by this much before converging, so the entry has changed by then.
const CLOCK_MARGIN: Duration = Duration::from_millis(50);

/// Converges customers as their keys cross a deadline (expiry, end of grace).
struct Clock {
    /// Every deadline up to here was handled.
    handled_until: chrono::DateTime<chrono::Utc>,
    /// When to converge next (the next deadline, or a bound for looking again).
    wake: tokio::time::Instant,
    looked_at: tokio::time::Instant,
}

impl Clock {
    async fn start(
        ctx: &Context,
        handled_until: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self, Error> {
        let mut clock = Self {
            handled_until,
            wake: tokio::time::Instant::now(),
            looked_at: tokio::time::Instant::now(),
        };
        clock.look_up(ctx).await?;
        Ok(clock)
    }

    /// Sets `wake` at the next deadline after `handled_until` (or a resync interval on).
    async fn look_up(&mut self, ctx: &Context) -> Result<(), Error> {
        let next = api_keys::next_clock_change(&ctx.db, self.handled_until).await?;
        let now = tokio::time::Instant::now();
        // A deadline already past (crossed while busy) is converged at once.
        let until = next.map_or(ctx.settings.resync_interval, |t| {
            let d = (t - chrono::Utc::now()).to_std().unwrap_or_default();
            d.min(ctx.settings.resync_interval)
        });
        self.wake = now + until + CLOCK_MARGIN;
        self.looked_at = now;
        Ok(())
    }

    async fn look_again_soon(&mut self, ctx: &Context) -> Result<(), Error> {
        if self.looked_at.elapsed() >= CLOCK_LOOKUP {
            self.look_up(ctx).await?;
        } else {
            // Not now (at most once a second), but no later than that.
            self.wake = self.wake.min(self.looked_at + CLOCK_LOOKUP);
        }
        Ok(())
    }

    /// Converges the customers whose keys crossed a deadline since the last pass.
    async fn converge_crossed(&mut self, ctx: &Context) -> Result<(), Error> {
        let now = chrono::Utc::now();
        let customers = api_keys::customers_crossing(&ctx.db, self.handled_until, now).await?;
        for customer_id in customers {
            ctx.metrics.config_clock_converges.inc();
            ctx.converge_customer(customer_id).await?;
        }
        self.handled_until = now;
        self.look_up(ctx).await
    }
}

/// Brings one key back to what Postgres says after a change we did not make.
async fn correct(ctx: &Context, relative: &str, current: Option<&[u8]>) -> Result<(), Error> {
    let desired = desired::desired_for(&mut *ctx.db.acquire().await?, relative).await?;
    if entry_verdict(desired.as_ref().map(|e| &e.value), current).is_drift() {
        repair(ctx, relative).await
    } else {
        Ok(())
    }
}

/// Repairs a key that differs from Postgres: through its customer's serialised
/// convergence when a customer owns it, otherwise by removing it.
async fn repair(ctx: &Context, relative: &str) -> Result<(), Error> {
    let Some(customer_id) = owning_customer(&ctx.db, relative).await? else {
        return prune(ctx, relative).await;
    };
    let changed = ctx.converge_customer(customer_id).await?;
    let desired = desired::desired_for(&mut *ctx.db.acquire().await?, relative).await?;
    let key = ctx.platform.key(relative);
    let Some(entry) = desired else {
        if !changed {
            // A key its customer's convergence no longer reads (retired for good,
            // marked gone) that came back by hand: removed here.
            return prune(ctx, relative).await;
        }
        ctx.metrics.drift_corrected("unowned");
        tracing::info!(%key, "removed etcd key that no resource owns");
        return Ok(());
    };
    if changed {
        ctx.metrics.drift_corrected(key_kind(relative));
        tracing::info!(%key, "restored etcd key changed outside the operator");
        let note = format!("{key} was changed or deleted outside the operator; restored it");
        ctx.event(
            &entry.owner,
            K8sEventType::Warning,
            "DriftCorrected",
            "SyncConfig",
            note,
        )
        .await;
    }
    Ok(())
}

/// The customer whose rows a key is derived from; `None` for a key nothing owns.
async fn owning_customer(db: &sqlx::PgPool, relative: &str) -> Result<Option<Uuid>, sqlx::Error> {
    Ok(match desired::classify(relative) {
        KeyOwner::Customer(id) | KeyOwner::Quota(id) => Some(id),
        KeyOwner::ApiKey(hash) => api_keys::live_by_hash(db, &hash)
            .await?
            .map(|row| row.customer_id),
        KeyOwner::Unowned => None,
    })
}

async fn prune(ctx: &Context, relative: &str) -> Result<(), Error> {
    let key = ctx.platform.key(relative);
    // An etcd write happens only while a transaction that passed the fence is open.
    let fenced = ctx.begin_write().await?;
    let removed = ctx.platform.remove(&key).await?;
    fenced.commit().await?;
    if removed.is_some() {
        ctx.metrics.drift_corrected("unowned");
        tracing::info!(%key, "removed etcd key that no resource owns");
    }
    Ok(())
}

fn key_kind(relative: &str) -> &str {
    relative.split('/').next().unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_kinds() {
        assert_eq!(
            key_kind(&m3o_platform_contract::customer_key("abc")),
            "customers"
        );
    }
}

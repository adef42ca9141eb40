//! Confirmed propagation: each replica publishes the etcd revision its index has
//! applied at `<prefix>/gateways/<replica id>` = `{"appliedRevision": N}`, under a
//! lease, so the key disappears when the replica dies or is cut off, with its
//! `--max-staleness` (and `"staleMode": "serve"` under that mode). The operator compares
//! the applied revision with the revision of its last write to a key's entry (condition
//! `GatewaySynced`), and counts a replica whose report vanished until its bound has
//! passed: by then a replica cut off from etcd refuses checks (`follow`).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::entries::GatewayReport;
use crate::follow::IndexState;
use crate::settings::StaleMode;

/// Lease time to live: a dead replica's report is gone within this.
const LEASE_TTL_SECS: i64 = 10;
/// Reports are written at most this often.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const RETRY: Duration = Duration::from_secs(1);
/// The shortest keep-alive period (for a very small `--max-staleness`).
const MIN_KEEP_ALIVE: Duration = Duration::from_millis(100);

/// What a replica says about itself besides its applied revision.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub max_staleness: Duration,
    pub mode: StaleMode,
}

impl Bound {
    /// The report of `applied_revision` under this bound (whole seconds, rounded up:
    /// the operator must not stop counting the replica before it stops serving).
    pub fn report(&self, applied_revision: i64) -> GatewayReport {
        let millis = self.max_staleness.as_millis() as u64;
        GatewayReport {
            applied_revision,
            max_staleness_seconds: Some(millis.div_ceil(1000)),
            stale_mode: match self.mode {
                StaleMode::Fail => None,
                StaleMode::Serve => Some(m3o_platform_contract::StaleMode::Serve),
            },
            stopped: false,
        }
    }

    /// How often the lease is renewed: each renewal confirms the replica, so a third of
    /// the bound (and of the lease) keeps a healthy one well inside both.
    fn keep_alive_every(&self) -> Duration {
        (Duration::from_secs(LEASE_TTL_SECS as u64) / 3)
            .min(self.max_staleness / 3)
            .max(MIN_KEEP_ALIVE)
    }
}

/// The report key of a replica.
pub fn report_key(prefix: &str, replica: &str) -> String {
    format!("{prefix}/{}", m3o_platform_contract::gateway_key(replica))
}

/// Publishes the applied revision until `shutdown` (cancelled once the replica answers
/// no more checks, see `Gateway::stop`), then says it has stopped and revokes the lease.
pub async fn run(
    client: Client,
    key: String,
    state: Arc<IndexState>,
    bound: Bound,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        if let Err(err) = session(&client, &key, &state, bound, &shutdown).await {
            tracing::warn!(%err, "cannot report the applied revision to etcd; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }
}

/// One lease: report, keep it alive, report again on each applied revision.
async fn session(
    client: &Client,
    key: &str,
    state: &IndexState,
    bound: Bound,
    shutdown: &CancellationToken,
) -> Result<(), etcd_client::Error> {
    let mut applied = state.applied();
    // Registering before the first list would count a replica that accepts nothing yet.
    while *applied.borrow_and_update() == 0 {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            changed = applied.changed() => if changed.is_err() { return Ok(()) },
        }
    }
    let mut client = client.clone();
    // A renewal counts from when it was sent: the lease lives at least TTL from then.
    let sent = Instant::now();
    let lease = client.lease_grant(LEASE_TTL_SECS, None).await?.id();
    state.report_renewed(sent.into_std());
    let (mut keeper, mut alive) = client.lease_keep_alive(lease).await?;
    let mut keep_alive = tokio::time::interval(bound.keep_alive_every());
    let mut published = 0;
    let mut last_put = Instant::now() - MIN_INTERVAL;
    loop {
        let revision = *applied.borrow_and_update();
        if revision != published {
            tokio::time::sleep_until(last_put + MIN_INTERVAL).await;
            let value = serde_json::to_vec(&bound.report(revision)).unwrap_or_default();
            client
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await?;
            last_put = Instant::now();
            published = revision;
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                // The servers stop with the same token: say so, so the operator forgets
                // this replica as soon as its report is gone (whatever its bound), then
                // go at once rather than after the lease's time to live.
                let last = GatewayReport {
                    stopped: true,
                    ..bound.report(published)
                };
                let value = serde_json::to_vec(&last).unwrap_or_default();
                if let Err(err) = client
                    .put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
                {
                    tracing::warn!(%err, "cannot report that this replica stopped");
                }
                let _ = client.lease_revoke(lease).await;
                return Ok(());
            }
            _ = keep_alive.tick() => {
                let sent = Instant::now();
                keeper.keep_alive().await?;
                match alive.message().await? {
                    Some(r) if r.ttl() > 0 => state.report_renewed(sent.into_std()),
                    _ => return Err(etcd_client::Error::LeaseKeepAliveError("lease expired".into())),
                }
            }
            changed = applied.changed() => if changed.is_err() { return Ok(()) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_the_contract_value_under_gateways() {
        assert_eq!(report_key("/m3o", "gw-1"), "/m3o/gateways/gw-1");
        let fail = Bound {
            max_staleness: Duration::from_millis(2500),
            mode: StaleMode::Fail,
        };
        let value = serde_json::to_value(fail.report(812)).expect("json");
        assert_eq!(
            value,
            serde_json::json!({"appliedRevision": 812, "maxStalenessSeconds": 3})
        );
        let serve = Bound {
            mode: StaleMode::Serve,
            ..fail
        };
        let value = serde_json::to_value(serve.report(812)).expect("json");
        assert_eq!(
            value,
            serde_json::json!({"appliedRevision": 812, "maxStalenessSeconds": 3, "staleMode": "serve"})
        );
    }

    #[test]
    fn the_lease_is_renewed_well_inside_the_bound() {
        let bound = |secs| Bound {
            max_staleness: Duration::from_secs(secs),
            mode: StaleMode::Fail,
        };
        assert_eq!(bound(10).keep_alive_every(), Duration::from_secs(10) / 3);
        assert_eq!(bound(3).keep_alive_every(), Duration::from_secs(1));
        assert_eq!(bound(60).keep_alive_every(), Duration::from_secs(10) / 3);
    }
}

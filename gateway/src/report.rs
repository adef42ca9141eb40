//! Confirmed propagation: each replica publishes the etcd revision its index has
//! applied at `<prefix>/gateways/<replica id>` = `{"appliedRevision": N}`, under a
//! lease, so the key disappears when the replica dies. The operator compares it with
//! the revision of its last write to a key's entry (condition `GatewaySynced`).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::entries::GatewayReport;
use crate::follow::IndexState;

/// Lease time to live: a dead replica's report is gone within this.
const LEASE_TTL_SECS: i64 = 10;
/// Reports are written at most this often.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const RETRY: Duration = Duration::from_secs(1);

/// The report key of a replica.
pub fn report_key(prefix: &str, replica: &str) -> String {
    format!("{prefix}/{}", m3o_platform_contract::gateway_key(replica))
}

/// Publishes the applied revision until `shutdown`, then revokes the lease.
pub async fn run(client: Client, key: String, state: Arc<IndexState>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Err(err) = session(&client, &key, &state, &shutdown).await {
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
    let lease = client.lease_grant(LEASE_TTL_SECS, None).await?.id();
    let (mut keeper, mut alive) = client.lease_keep_alive(lease).await?;
    let mut keep_alive = tokio::time::interval(Duration::from_secs(LEASE_TTL_SECS as u64 / 3));
    let mut published = 0;
    let mut last_put = Instant::now() - MIN_INTERVAL;
    loop {
        let revision = *applied.borrow_and_update();
        if revision != published {
            tokio::time::sleep_until(last_put + MIN_INTERVAL).await;
            let value = serde_json::to_vec(&GatewayReport {
                applied_revision: revision,
            })
            .unwrap_or_default();
            client
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await?;
            last_put = Instant::now();
            published = revision;
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                // Gone at once rather than after the lease's time to live.
                let _ = client.lease_revoke(lease).await;
                return Ok(());
            }
            _ = keep_alive.tick() => {
                keeper.keep_alive().await?;
                match alive.message().await? {
                    Some(r) if r.ttl() > 0 => {}
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
        let value = serde_json::to_value(GatewayReport {
            applied_revision: 812,
        })
        .expect("json");
        assert_eq!(value, serde_json::json!({"appliedRevision": 812}));
    }
}

//! Condition `GatewaySynced`: True once every live gateway replica has applied the etcd
//! revision of the operator's last write to this resource's key entries (a block, an
//! expiry, a revocation), so `kubectl wait --for=condition=GatewaySynced` after
//! `blocked: true` means no gateway accepts the key any more. Unknown while no replica
//! is registered. `Ready` does not depend on it. Re-checked when a replica's report
//! changes (a watch on `<prefix>/gateways/`) and, while False, on a short requeue.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use m3o_crds::{ApiKey, ApiKeyStatus};
use tokio::sync::mpsc;

use crate::report::error::Error;
use crate::report::status::{Cond, merge, types};
use crate::runtime::context::Context;
use crate::store::api_keys;

pub const SYNCED: &str = "Synced";
pub const PROPAGATING: &str = "Propagating";
pub const NO_GATEWAYS: &str = "NoGatewayRegistered";

/// While some replica lags, look again this soon even without a report change.
const RECHECK: Duration = Duration::from_secs(2);
const WATCH_RETRY: Duration = Duration::from_secs(2);

/// The condition for a required revision and the replicas' applied revisions.
pub fn decide(required: i64, applied: &[i64]) -> Cond {
    let total = applied.len();
    if total == 0 {
        return Cond::unknown(
            types::GATEWAY_SYNCED,
            NO_GATEWAYS,
            "no gateway replica is registered under <prefix>/gateways/; nothing can confirm propagation",
        );
    }
    let done = applied.iter().filter(|r| **r >= required).count();
    if done == total {
        let message = format!("{done}/{total} gateway replicas have applied revision {required}");
        Cond::new(types::GATEWAY_SYNCED, true, SYNCED, message)
    } else {
        let message = format!(
            "{done}/{total} gateway replicas have applied revision {required}; waiting for the others"
        );
        Cond::new(types::GATEWAY_SYNCED, false, PROPAGATING, message)
    }
}

/// The condition of `key` now: its last entry write (recorded in Postgres, else the
/// entry's own revision in etcd) against every live replica's report. `None` when no
/// write is known (nothing to confirm).
pub async fn condition(
    ctx: &Context,
    key: &ApiKey,
    current_hash: Option<&str>,
) -> Result<Option<Cond>, Error> {
    let ns = key.namespace().unwrap_or_default();
    let recorded =
        api_keys::max_config_revision_for_resource(&ctx.db, &ns, &key.name_any()).await?;
    let required = match (recorded, current_hash) {
        (Some(r), _) => Some(r),
        // Written before revisions were recorded: the entry's own last write.
        (None, Some(hash)) => {
            let entry = ctx.platform.key(&m3o_platform_contract::apikey_key(hash));
            ctx.platform.mod_revision(&entry).await?
        }
        (None, None) => None,
    };
    let Some(required) = required else {
        return Ok(None);
    };
    Ok(Some(decide(
        required,
        &ctx.platform.gateway_reports().await?,
    )))
}

/// Sets `cond` in `status`.
pub fn set(status: &mut ApiKeyStatus, cond: Option<Cond>, generation: Option<i64>) {
    if let Some(cond) = cond {
        status.conditions = merge(&status.conditions, &[cond], generation);
    }
}

/// When to look again: `wake_at`, or sooner while a replica lags.
pub fn wake_at(cond: Option<&Cond>, wake_at: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    let lagging = cond.is_some_and(|c| c.status == "False");
    let recheck = lagging.then(|| Utc::now() + RECHECK);
    match (wake_at, recheck) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// True when the key's status says its gateways are synced.
fn synced(key: &ApiKey) -> bool {
    key.status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == types::GATEWAY_SYNCED)
        })
        .is_none_or(|c| c.status == "True")
}

/// ApiKeys to re-check whenever a replica registers, reports or leaves: those whose
/// `GatewaySynced` is not True.
pub fn report_changes(
    ctx: Arc<Context>,
    keys: Store<ApiKey>,
) -> impl Stream<Item = ObjectRef<ApiKey>> + Send + 'static {
    // Capacity 1: a burst of reports is one re-check.
    let (tx, rx) = mpsc::channel::<()>(1);
    tokio::spawn(forward_report_changes(ctx, tx));
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|()| ((), rx)) },
    )
    .flat_map(move |()| {
        let refs: Vec<_> = keys
            .state()
            .iter()
            .filter(|k| !synced(k))
            .map(|k| ObjectRef::from_obj(k.as_ref()))
            .collect();
        futures::stream::iter(refs)
    })
}

async fn forward_report_changes(ctx: Arc<Context>, tx: mpsc::Sender<()>) {
    loop {
        match ctx.platform.watch_gateway_reports().await {
            Ok(mut stream) => loop {
                let message = tokio::select! {
                    _ = tx.closed() => return,
                    m = stream.message() => m,
                };
                match message {
                    Ok(Some(response)) if response.canceled() => break,
                    Ok(Some(response)) => {
                        if !response.events().is_empty()
                            && let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(())
                        {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(err) => {
                        tracing::debug!(%err, "gateway report watch interrupted");
                        break;
                    }
                }
            },
            Err(err) => tracing::debug!(%err, "cannot watch gateway reports; retrying"),
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(WATCH_RETRY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_live_replica_must_have_applied_the_revision() {
        let c = decide(10, &[]);
        assert_eq!((c.status, c.reason), ("Unknown", NO_GATEWAYS));
        let c = decide(10, &[10, 12]);
        assert_eq!((c.status, c.reason), ("True", SYNCED));
        assert!(c.message.starts_with("2/2 "));
        let c = decide(10, &[12, 9]);
        assert_eq!((c.status, c.reason), ("False", PROPAGATING));
        assert!(c.message.starts_with("1/2 "));
    }

    #[test]
    fn a_lagging_replica_brings_the_next_check_forward() {
        let later = Utc::now() + chrono::Duration::hours(1);
        let lagging = decide(10, &[1]);
        assert!(wake_at(Some(&lagging), Some(later)).is_some_and(|t| t < later));
        let done = decide(10, &[10]);
        assert_eq!(wake_at(Some(&done), Some(later)), Some(later));
        assert_eq!(wake_at(None, None), None);
    }
}

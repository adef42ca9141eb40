//! Condition `GatewaySynced`: True once every gateway replica that may still be serving
//! has applied the etcd revision of the operator's last write to this resource's key
//! entries (a block, an expiry, a revocation), so `kubectl wait
//! --for=condition=GatewaySynced` after `blocked: true` means no gateway accepts the key
//! any more. A replica may still be serving while it reports, and after its report has
//! vanished (its lease expired: stopped, or cut off from etcd) until its
//! `--max-staleness` has passed: a cut-off replica refuses checks by then. A replica under
//! `--stale-mode=serve` (or without a bound) may serve a stale snapshot for ever, so it
//! voids True. Unknown while no replica counts. `Ready` does not depend on it.
//! Re-checked when a replica's report changes (a watch on `<prefix>/gateways/`) and,
//! while False, on a short requeue.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use m3o_crds::{ApiKey, ApiKeyStatus};
use tokio::sync::mpsc;

use crate::platform::gateway_roster::{ReplicaView, RosterView};
use crate::report::error::Error;
use crate::report::status::{Cond, merge, types};
use crate::runtime::context::Context;
use crate::store::api_keys;

pub const SYNCED: &str = "Synced";
pub const PROPAGATING: &str = "Propagating";
pub const NO_GATEWAYS: &str = "NoGatewayRegistered";
/// A replica stopped reporting before applying the revision, within its bound.
pub const REPLICA_UNREACHABLE: &str = "ReplicaUnreachable";
/// A replica may serve a stale snapshot for ever (`--stale-mode=serve`, no bound).
pub const STALE_MODE_SERVE: &str = "StaleModeServe";
/// Departures before the operator followed the reports are unknown for one bound.
pub const RECENTLY_STARTED: &str = "RecentlyStarted";

/// While some replica lags, look again this soon even without a report change.
const RECHECK: Duration = Duration::from_secs(2);
const WATCH_RETRY: Duration = Duration::from_secs(2);
/// The gateway's default `--max-staleness`: the bound assumed for a replica that may
/// have left before the operator followed the reports.
const DEFAULT_BOUND: Duration = Duration::from_secs(10);

/// The condition for a required revision and the replicas as the roster sees them.
pub fn decide(required: i64, roster: &RosterView) -> Cond {
    let cond = |ok, reason, message: String| Cond::new(types::GATEWAY_SYNCED, ok, reason, message);
    // Reporting replicas, and departed ones still within their bound (the roster drops
    // them once past it); a departed one without a bound stays.
    let counted = &roster.replicas;
    let total = counted.len();
    if total == 0 {
        return Cond::unknown(
            types::GATEWAY_SYNCED,
            NO_GATEWAYS,
            "no gateway replica is registered under <prefix>/gateways/; nothing can confirm propagation",
        );
    }
    let applied = |r: &ReplicaView| r.report.applied_revision >= required;
    let done = counted.iter().filter(|r| applied(r)).count();
    let tally = format!("{done}/{total} gateway replicas have applied revision {required}");
    // A replica that may serve an unconfirmed snapshot for ever voids True, even one
    // that has applied the revision now: it cannot be trusted to apply the next.
    if let Some(r) = counted
        .iter()
        .find(|r| r.report.staleness_bound().is_none())
    {
        let why = if r.report.stale_mode.is_some() {
            "runs with --stale-mode=serve: cut off from etcd it keeps serving its last snapshot"
        } else {
            "reports no --max-staleness (an unreadable report or a gateway without the flag): it may serve a stale snapshot for ever"
        };
        let left = if r.gone_for.is_some() {
            ", and has stopped reporting"
        } else {
            ""
        };
        return cond(
            false,
            STALE_MODE_SERVE,
            format!(
                "{tally}; replica {} {why}{left}, so propagation cannot be confirmed (run every replica with --stale-mode=fail)",
                r.id
            ),
        );
    }
    let lagging = |gone: bool| {
        counted
            .iter()
            .find(|r| !applied(r) && r.gone_for.is_some() == gone)
    };
    if let Some(r) = lagging(false) {
        return cond(
            false,
            PROPAGATING,
            format!(
                "{tally}; waiting for the others (replica {} is at revision {})",
                r.id, r.report.applied_revision
            ),
        );
    }
    if let Some(r) = lagging(true) {
        return cond(
            false,
            REPLICA_UNREACHABLE,
            format!(
                "{tally}; replica {} stopped reporting at revision {} and may serve that snapshot until its --max-staleness ({}s) has passed since it left",
                r.id,
                r.report.applied_revision,
                r.report.staleness_bound().unwrap_or_default()
            ),
        );
    }
    // A replica that left before the reports were followed is unknown: it may serve
    // for up to its bound, assumed the largest seen and at least the default.
    let bound = counted
        .iter()
        .filter_map(|r| r.report.staleness_bound())
        .map(Duration::from_secs)
        .fold(DEFAULT_BOUND, Duration::max);
    if roster.followed_for.is_none_or(|f| f < bound) {
        return cond(
            false,
            RECENTLY_STARTED,
            format!(
                "{tally}; the operator has followed gateway reports for less than {}s, so a replica that stopped reporting before then may still serve its snapshot",
                bound.as_secs()
            ),
        );
    }
    cond(true, SYNCED, tally)
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
    Ok(Some(decide(required, &ctx.platform.gateway_roster())))
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

/// The key's `GatewaySynced` condition in its status, if any.
fn gateway_synced(key: &ApiKey) -> Option<&m3o_crds::Condition> {
    let status = key.status.as_ref()?;
    status
        .conditions
        .iter()
        .find(|c| c.type_ == types::GATEWAY_SYNCED)
}

/// ApiKeys to re-check whenever a replica registers, reports or leaves (and once the
/// reports are first listed, for what changed while the operator was down): those
/// whose `GatewaySynced` is not True and may change with the roster.
pub fn report_changes(
    ctx: Arc<Context>,
    keys: Store<ApiKey>,
) -> impl Stream<Item = ObjectRef<ApiKey>> + Send + 'static {
    // Capacity 1: a burst of reports is one re-check.
    let (tx, rx) = mpsc::channel::<()>(1);
    tokio::spawn(forward_report_changes(ctx.clone(), tx));
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|()| ((), rx)) },
    )
    .then(move |()| {
        let (ctx, keys) = (ctx.clone(), keys.clone());
        async move {
            // The first re-check can come before the keys have listed: it must not
            // miss them (their requeues did not survive a restart).
            crate::runtime::context::listed(&keys).await;
            let roster = ctx.platform.gateway_roster();
            let refs: Vec<_> = keys
                .state()
                .iter()
                .filter(|k| may_change(k, &roster))
                .map(|k| ObjectRef::from_obj(k.as_ref()))
                .collect();
            futures::stream::iter(refs)
        }
    })
    .flatten()
}

/// Whether `key`'s `GatewaySynced` may change with `roster`: it is there and not True,
/// and it is not "no replica registered" while still none is.
fn may_change(key: &ApiKey, roster: &RosterView) -> bool {
    match gateway_synced(key) {
        // No write to confirm yet.
        None => false,
        Some(c) if c.status == "True" => false,
        Some(c) => !(c.reason == NO_GATEWAYS && roster.replicas.is_empty()),
    }
}

/// Follows the reports into the roster (a list, then a watch from its revision; a
/// re-list after any break) and asks for a re-check on every change.
async fn forward_report_changes(ctx: Arc<Context>, tx: mpsc::Sender<()>) {
    let recheck = |tx: &mpsc::Sender<()>| {
        matches!(tx.try_send(()), Err(mpsc::error::TrySendError::Closed(())))
    };
    loop {
        let followed = async {
            let revision = ctx.platform.list_gateway_reports().await?;
            if recheck(&tx) {
                return Ok(None);
            }
            ctx.platform.watch_gateway_reports(revision).await.map(Some)
        };
        match followed.await {
            Ok(Some(mut stream)) => loop {
                let message = tokio::select! {
                    _ = tx.closed() => return,
                    m = stream.message() => m,
                };
                match message {
                    Ok(Some(response)) if response.canceled() => break,
                    Ok(Some(response)) => {
                        if ctx.platform.note_gateway_reports(&response) && recheck(&tx) {
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
            Ok(None) => return,
            Err(err) => tracing::debug!(%err, "cannot follow gateway reports; retrying"),
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(WATCH_RETRY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use m3o_platform_contract::{GatewayReport, StaleMode};

    use super::*;

    fn replica(id: &str, applied: i64, gone_for: Option<u64>) -> ReplicaView {
        ReplicaView {
            id: id.into(),
            report: GatewayReport {
                applied_revision: applied,
                max_staleness_seconds: Some(10),
                stale_mode: None,
                stopped: false,
            },
            gone_for: gone_for.map(Duration::from_secs),
        }
    }

    fn roster(replicas: Vec<ReplicaView>) -> RosterView {
        RosterView {
            replicas,
            followed_for: Some(Duration::from_secs(60)),
        }
    }

    fn key_with(cond: Option<(&str, &str)>) -> ApiKey {
        let conditions: Vec<_> = cond
            .map(|(status, reason)| {
                serde_json::json!({"type": "GatewaySynced", "status": status, "reason": reason,
                    "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"})
            })
            .into_iter()
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "m3o.com/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "k", "namespace": "ns"},
            "spec": {"customerRef": {"name": "c"}, "description": "d", "scopes": ["*"]},
            "status": {"conditions": conditions},
        }))
        .expect("a valid ApiKey")
    }

    #[test]
    fn a_report_change_rechecks_only_keys_whose_condition_it_may_change() {
        let none = roster(vec![]);
        let one = roster(vec![replica("a", 10, None)]);
        for r in [&none, &one] {
            assert!(!may_change(&key_with(None), r), "nothing written yet");
            assert!(!may_change(&key_with(Some(("True", SYNCED))), r));
            assert!(may_change(&key_with(Some(("False", PROPAGATING))), r));
        }
        let unregistered = key_with(Some(("Unknown", NO_GATEWAYS)));
        assert!(!may_change(&unregistered, &none), "still no replica");
        assert!(may_change(&unregistered, &one), "a replica registered");
    }

    #[test]
    fn every_reporting_replica_must_have_applied_the_revision() {
        let c = decide(10, &roster(vec![]));
        assert_eq!((c.status, c.reason), ("Unknown", NO_GATEWAYS));
        let c = decide(
            10,
            &roster(vec![replica("a", 10, None), replica("b", 12, None)]),
        );
        assert_eq!((c.status, c.reason), ("True", SYNCED));
        assert_eq!(c.message, "2/2 gateway replicas have applied revision 10");
        let c = decide(
            10,
            &roster(vec![replica("a", 12, None), replica("b", 9, None)]),
        );
        assert_eq!((c.status, c.reason), ("False", PROPAGATING));
        assert!(c.message.starts_with("1/2 "), "{}", c.message);
        assert!(
            c.message.contains("replica b is at revision 9"),
            "{}",
            c.message
        );
    }

    #[test]
    fn a_replica_that_left_behind_counts_until_its_bound_has_passed() {
        // Cut off before the block: its report vanished, it may serve revision 9 still.
        let c = decide(
            10,
            &roster(vec![replica("a", 10, None), replica("b", 9, Some(4))]),
        );
        assert_eq!((c.status, c.reason), ("False", REPLICA_UNREACHABLE));
        assert!(c.message.starts_with("1/2 "), "{}", c.message);
        assert!(
            c.message
                .contains("replica b stopped reporting at revision 9"),
            "{}",
            c.message
        );
        // One that left after applying it never accepts the key again.
        let c = decide(
            10,
            &roster(vec![replica("a", 10, None), replica("b", 10, Some(4))]),
        );
        assert_eq!((c.status, c.reason), ("True", SYNCED));
        assert!(c.message.starts_with("2/2 "), "{}", c.message);
        // Past its bound the roster drops it (platform::gateways): 1/1.
        let c = decide(10, &roster(vec![replica("a", 10, None)]));
        assert_eq!((c.status, c.reason), ("True", SYNCED));
        // A lagging reporting replica is named first.
        let c = decide(
            10,
            &roster(vec![replica("a", 9, None), replica("b", 9, Some(1))]),
        );
        assert_eq!(c.reason, PROPAGATING);
        // Only departed replicas, within their bound: still not True.
        let c = decide(10, &roster(vec![replica("b", 9, Some(1))]));
        assert_eq!((c.status, c.reason), ("False", REPLICA_UNREACHABLE));
    }

    #[test]
    fn a_replica_that_may_serve_for_ever_voids_true() {
        let mut serve = replica("s", 12, None);
        serve.report.stale_mode = Some(StaleMode::Serve);
        let c = decide(10, &roster(vec![replica("a", 10, None), serve.clone()]));
        assert_eq!((c.status, c.reason), ("False", STALE_MODE_SERVE));
        assert!(c.message.starts_with("2/2 "), "{}", c.message);
        assert!(
            c.message.contains("replica s runs with --stale-mode=serve"),
            "{}",
            c.message
        );
        let mut old = replica("o", 12, None);
        old.report.max_staleness_seconds = None;
        let c = decide(10, &roster(vec![old]));
        assert_eq!(c.reason, STALE_MODE_SERVE);
        assert!(c.message.contains("no --max-staleness"), "{}", c.message);
    }

    #[test]
    fn after_a_start_departures_are_unknown_for_one_bound() {
        let mut view = roster(vec![replica("a", 10, None)]);
        view.followed_for = None;
        assert_eq!(decide(10, &view).reason, RECENTLY_STARTED);
        view.followed_for = Some(Duration::from_secs(9));
        let c = decide(10, &view);
        assert_eq!((c.status, c.reason), ("False", RECENTLY_STARTED));
        assert!(c.message.starts_with("1/1 "), "{}", c.message);
        // The largest bound seen, if above the default.
        view.replicas[0].report.max_staleness_seconds = Some(30);
        view.followed_for = Some(Duration::from_secs(20));
        assert_eq!(decide(10, &view).reason, RECENTLY_STARTED);
        view.followed_for = Some(Duration::from_secs(30));
        assert_eq!(decide(10, &view).reason, SYNCED);
    }

    #[test]
    fn a_lagging_replica_brings_the_next_check_forward() {
        let later = Utc::now() + chrono::Duration::hours(1);
        let lagging = decide(10, &roster(vec![replica("a", 1, None)]));
        assert!(wake_at(Some(&lagging), Some(later)).is_some_and(|t| t < later));
        let done = decide(10, &roster(vec![replica("a", 10, None)]));
        assert_eq!(wake_at(Some(&done), Some(later)), Some(later));
        assert_eq!(wake_at(None, None), None);
    }
}

//! What the operator has seen of the gateway replicas' reports (pure bookkeeping, fed
//! by `gateways`): each replica's last report, and when a departed one left. A report
//! vanishes when its replica stops or is cut off from etcd; a cut-off replica may go on
//! serving for its bound, so a departed replica is remembered until that has passed.
//! A replica whose last report said it stopped (a graceful shutdown) is forgotten as
//! soon as it departs; departed replicas without a bound are kept up to
//! [`MAX_UNBOUNDED_DEPARTED`], the oldest forgotten beyond it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use m3o_platform_contract::GatewayReport;

/// How many departed replicas without a bound (serve mode, an older gateway) are kept:
/// each may still serve, but pod churn must not grow the roster for ever. Beyond this the
/// oldest departures are forgotten (with a warning).
pub const MAX_UNBOUNDED_DEPARTED: usize = 64;

/// A report as read; an unreadable one has nothing applied and no bound (it confirms
/// nothing and is never assumed to have stopped serving).
pub fn parse_report(value: &[u8]) -> GatewayReport {
    serde_json::from_slice::<GatewayReport>(value).unwrap_or_default()
}

/// What this process has seen of the replicas' reports.
#[derive(Debug, Default)]
pub struct Roster {
    replicas: BTreeMap<String, Known>,
    /// Since when every registration and departure has been seen (the last full list,
    /// followed by an unbroken watch); `None` before the first list.
    followed_since: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Known {
    report: GatewayReport,
    /// When its report was seen to vanish (never earlier than its lease expired).
    gone_since: Option<Instant>,
}

/// One replica as the decision sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaView {
    pub id: String,
    pub report: GatewayReport,
    /// How long ago its report vanished; `None` while it reports.
    pub gone_for: Option<Duration>,
}

/// The roster at one instant (pure input of the `GatewaySynced` decision).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RosterView {
    pub replicas: Vec<ReplicaView>,
    /// How long every departure has been seen; `None` before the first list.
    pub followed_for: Option<Duration>,
}

impl Roster {
    /// A full list of the current reports at `now`: known replicas missing from it are
    /// gone from now on (a departure during a gap in the watch is noticed late, which
    /// only makes the operator wait longer). Departures before `now` that left no trace
    /// are unknown: the view says since when it has followed.
    pub fn listed(&mut self, reports: Vec<(String, GatewayReport)>, now: Instant) {
        let listed: BTreeMap<_, _> = reports.into_iter().collect();
        for (id, known) in &mut self.replicas {
            if !listed.contains_key(id) && known.gone_since.is_none() {
                known.gone_since = Some(now);
            }
        }
        for (id, report) in listed {
            self.put(id, report);
        }
        self.followed_since = Some(now);
    }

    /// A replica registered or reported.
    pub fn put(&mut self, id: String, report: GatewayReport) {
        self.replicas.insert(
            id,
            Known {
                report,
                gone_since: None,
            },
        );
    }

    /// A replica's report vanished at `now`.
    pub fn gone(&mut self, id: &str, now: Instant) {
        if let Some(known) = self.replicas.get_mut(id) {
            known.gone_since.get_or_insert(now);
        }
    }

    /// The roster at `now`. Departed replicas past their bound, or whose last report
    /// said they stopped, are dropped: they have stopped serving and never count again.
    /// Departed replicas without a bound beyond [`MAX_UNBOUNDED_DEPARTED`] are dropped
    /// oldest first.
    pub fn view(&mut self, now: Instant) -> RosterView {
        self.replicas.retain(|_, k| match k.gone_since {
            Some(_) if k.report.stopped => false,
            Some(since) => match k.report.staleness_bound() {
                Some(bound) => now.saturating_duration_since(since) <= Duration::from_secs(bound),
                None => true,
            },
            None => true,
        });
        let mut unbounded: Vec<(Instant, String)> = self
            .replicas
            .iter()
            .filter(|(_, k)| k.report.staleness_bound().is_none())
            .filter_map(|(id, k)| k.gone_since.map(|since| (since, id.clone())))
            .collect();
        if unbounded.len() > MAX_UNBOUNDED_DEPARTED {
            unbounded.sort();
            let excess = unbounded.len() - MAX_UNBOUNDED_DEPARTED;
            for (_, id) in unbounded.into_iter().take(excess) {
                self.replicas.remove(&id);
            }
            tracing::warn!(
                forgotten = excess,
                kept = MAX_UNBOUNDED_DEPARTED,
                "more departed gateway replicas without a staleness bound than are kept: forgot the oldest (one may still serve a stale snapshot; GatewaySynced no longer waits for it)"
            );
        }
        RosterView {
            replicas: self
                .replicas
                .iter()
                .map(|(id, k)| ReplicaView {
                    id: id.clone(),
                    report: k.report,
                    gone_for: k.gone_since.map(|s| now.saturating_duration_since(s)),
                })
                .collect(),
            followed_for: self
                .followed_since
                .map(|s| now.saturating_duration_since(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(applied: i64, bound: Option<u64>) -> GatewayReport {
        GatewayReport {
            applied_revision: applied,
            max_staleness_seconds: bound,
            stale_mode: None,
            stopped: false,
        }
    }

    #[test]
    fn reports_parse_and_unreadable_ones_confirm_nothing() {
        let r = parse_report(br#"{"appliedRevision":42,"maxStalenessSeconds":10}"#);
        assert_eq!((r.applied_revision, r.staleness_bound()), (42, Some(10)));
        let junk = parse_report(b"junk");
        assert_eq!((junk.applied_revision, junk.staleness_bound()), (0, None));
    }

    #[test]
    fn a_departed_replica_is_remembered_until_its_bound_has_passed() {
        let t0 = Instant::now();
        let mut roster = Roster::default();
        assert_eq!(roster.view(t0).followed_for, None);
        roster.listed(
            vec![
                ("a".into(), report(5, Some(10))),
                ("b".into(), report(5, Some(3))),
            ],
            t0,
        );
        // b's lease expires: seen as a delete.
        roster.gone("b", t0 + Duration::from_secs(1));
        let view = roster.view(t0 + Duration::from_secs(2));
        assert_eq!(view.followed_for, Some(Duration::from_secs(2)));
        let b = view.replicas.iter().find(|r| r.id == "b").expect("b");
        assert_eq!(b.gone_for, Some(Duration::from_secs(1)));
        // A later delete does not move the departure.
        roster.gone("b", t0 + Duration::from_secs(3));
        let view = roster.view(t0 + Duration::from_secs(4));
        let b = view.replicas.iter().find(|r| r.id == "b").expect("b");
        assert_eq!(b.gone_for, Some(Duration::from_secs(3)));
        // Past its 3 s bound it is forgotten.
        let view = roster.view(t0 + Duration::from_millis(4100));
        assert_eq!(view.replicas.len(), 1, "{view:?}");
        // A replica missing from a re-list is gone from then; one that comes back reports.
        roster.put("b".into(), report(6, Some(3)));
        roster.listed(
            vec![("b".into(), report(7, Some(3)))],
            t0 + Duration::from_secs(5),
        );
        let view = roster.view(t0 + Duration::from_secs(6));
        let a = view.replicas.iter().find(|r| r.id == "a").expect("a");
        assert_eq!(a.gone_for, Some(Duration::from_secs(1)));
        let b = view.replicas.iter().find(|r| r.id == "b").expect("b");
        assert_eq!((b.gone_for, b.report.applied_revision), (None, 7));
        assert_eq!(view.followed_for, Some(Duration::from_secs(1)));
    }

    #[test]
    fn a_departed_replica_without_a_bound_is_kept_past_any_time() {
        let t0 = Instant::now();
        let mut roster = Roster::default();
        roster.listed(vec![("s".into(), report(5, None))], t0);
        roster.gone("s", t0);
        let view = roster.view(t0 + Duration::from_secs(3600));
        assert_eq!(view.replicas.len(), 1);
    }

    #[test]
    fn a_replica_that_said_it_stopped_is_forgotten_as_soon_as_it_departs() {
        let t0 = Instant::now();
        let mut roster = Roster::default();
        let serve = |applied| GatewayReport {
            stale_mode: Some(m3o_platform_contract::StaleMode::Serve),
            ..report(applied, Some(10))
        };
        roster.listed(
            vec![("s".into(), serve(5)), ("f".into(), report(5, Some(10)))],
            t0,
        );
        // Its last report says it stopped; while the report is there it still shows.
        roster.put(
            "s".into(),
            GatewayReport {
                stopped: true,
                ..serve(5)
            },
        );
        assert_eq!(roster.view(t0).replicas.len(), 2);
        roster.gone("s", t0 + Duration::from_secs(1));
        let view = roster.view(t0 + Duration::from_secs(1));
        let ids: Vec<_> = view.replicas.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["f"]);
        // A bounded one that stopped goes at once too, and so does one missing from a
        // re-list whose last report said it stopped.
        roster.put(
            "f".into(),
            GatewayReport {
                stopped: true,
                ..report(6, Some(10))
            },
        );
        roster.listed(vec![], t0 + Duration::from_secs(2));
        assert!(roster.view(t0 + Duration::from_secs(2)).replicas.is_empty());
    }

    #[test]
    fn departed_replicas_without_a_bound_are_capped_oldest_first() {
        let t0 = Instant::now();
        let mut roster = Roster::default();
        let extra = 3;
        for i in 0..MAX_UNBOUNDED_DEPARTED + extra {
            let id = format!("s{i:03}");
            roster.put(id.clone(), report(5, None));
            roster.gone(&id, t0 + Duration::from_secs(i as u64));
        }
        // A reporting one and a bounded departed one are not counted against the cap.
        roster.put("live".into(), report(5, None));
        roster.put("bounded".into(), report(5, Some(3600)));
        roster.gone("bounded", t0);
        let at = t0 + Duration::from_secs(1000);
        let view = roster.view(at);
        assert_eq!(view.replicas.len(), MAX_UNBOUNDED_DEPARTED + 2);
        let ids: Vec<_> = view.replicas.iter().map(|r| r.id.as_str()).collect();
        for i in 0..extra {
            assert!(!ids.contains(&format!("s{i:03}").as_str()), "{ids:?}");
        }
        for id in ["live", "bounded", "s003", "s066"] {
            assert!(ids.contains(&id), "{id}: {ids:?}");
        }
        assert_eq!(roster.view(at).replicas.len(), MAX_UNBOUNDED_DEPARTED + 2);
    }
}

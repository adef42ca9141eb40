//! Prometheus metrics of the operator, served on `/metrics` by the binary.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    pub kind: String,
    pub ready: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamGroupLabels {
    pub stream: String,
    pub group: String,
}

/// Counts a kind's resources as (Ready, not Ready) from a controller's cache.
type ResourceCounter = Box<dyn Fn() -> (i64, i64) + Send + Sync>;

/// Every metric family, registered once in [`Metrics::new`].
pub struct Metrics {
    resource_counters: std::sync::Mutex<Vec<(String, ResourceCounter)>>,
    pub registry: Registry,
    pub reconciles: Family<KindLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<KindLabels, Histogram>,
    pub resources: Family<ReadyLabels, Gauge>,
    pub drift_corrections: Family<KindLabels, Counter>,
    pub outbox_backlog: Gauge,
    pub outbox_oldest_age: Gauge<f64, AtomicU64>,
    pub events_published: Counter,
    pub outbox_parked: Gauge,
    pub outbox_rows_parked: Counter,
    pub stream_group_lag: Family<StreamGroupLabels, Gauge>,
    pub stream_group_pending: Family<StreamGroupLabels, Gauge>,
    pub leader: Gauge,
    pub plan_catalog_errors: Counter,
    pub config_keys_written: Counter,
    pub config_resyncs: Counter,
    pub config_clock_converges: Counter,
    pub resync_due: Family<KindLabels, Counter>,
    pub object_resyncs: Family<KindLabels, Counter>,
    pub fence_divergence: Counter,
    /// Age of the newest usage in Postgres: now minus the start of the last rollup that
    /// completed (README "Usage and quota").
    pub usage_rollup_lag: Gauge<f64, AtomicU64>,
    pub usage_rollups_failed: Counter,
    pub usage_rows_written: Counter,
    pub usage_threshold_events: Counter,
    pub rows_repaired: Family<KindLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("m3o_operator");
        let reconciles = Family::<KindLabels, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        let resources = Family::<ReadyLabels, Gauge>::default();
        let drift_corrections = Family::<KindLabels, Counter>::default();
        let outbox_backlog = Gauge::default();
        let outbox_oldest_age = Gauge::<f64, AtomicU64>::default();
        let events_published = Counter::default();
        let outbox_parked = Gauge::default();
        let outbox_rows_parked = Counter::default();
        let stream_group_lag = Family::<StreamGroupLabels, Gauge>::default();
        let stream_group_pending = Family::<StreamGroupLabels, Gauge>::default();
        let leader = Gauge::default();
        let plan_catalog_errors = Counter::default();
        let config_keys_written = Counter::default();
        let config_resyncs = Counter::default();
        let config_clock_converges = Counter::default();
        let resync_due = Family::<KindLabels, Counter>::default();
        let object_resyncs = Family::<KindLabels, Counter>::default();
        let fence_divergence = Counter::default();
        let rows_repaired = Family::<KindLabels, Counter>::default();
        registry.register("reconciles", "Reconciles run, by kind", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles failed, by kind and error",
            reconcile_errors.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Reconcile duration, by kind",
            prometheus_client::registry::Unit::Seconds,
            reconcile_duration.clone(),
        );
        registry.register(
            "resources",
            "Resources by kind and Ready status",
            resources.clone(),
        );
        registry.register(
            "drift_corrections",
            "etcd keys restored or removed after a hand edit, by key kind",
            drift_corrections.clone(),
        );
        registry.register(
            "outbox_backlog",
            "Outbox events waiting to be published (parked ones count in outbox_parked)",
            outbox_backlog.clone(),
        );
        registry.register_with_unit(
            "outbox_oldest_unpublished_age",
            "Age of the oldest unpublished outbox event",
            prometheus_client::registry::Unit::Seconds,
            outbox_oldest_age.clone(),
        );
        registry.register(
            "events_published",
            "Outbox events published to Redis Streams",
            events_published.clone(),
        );
        registry.register(
            "outbox_parked",
            "Outbox events parked now (refused by Redis --outbox-max-attempts times; re-drive with `m3o-operator outbox redrive`)",
            outbox_parked.clone(),
        );
        registry.register(
            "outbox_rows_parked",
            "Outbox events parked by this replica's relay",
            outbox_rows_parked.clone(),
        );
        registry.register(
            "stream_consumer_group_lag",
            "Entries of an event stream not yet delivered to a consumer group (leader only)",
            stream_group_lag.clone(),
        );
        registry.register(
            "stream_consumer_group_pending",
            "Entries delivered to a consumer group's consumers and not yet acknowledged (leader only)",
            stream_group_pending.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica is the leader",
            leader.clone(),
        );
        registry.register(
            "plan_catalog_errors",
            "Edits of --plans-file rejected as invalid (the previous catalog stays in force)",
            plan_catalog_errors.clone(),
        );
        registry.register(
            "config_keys_written",
            "etcd keys written or deleted by convergence (a converged fleet writes none)",
            config_keys_written.clone(),
        );
        registry.register(
            "config_resyncs",
            "Full comparisons of the etcd prefix with Postgres (at start and every resync interval)",
            config_resyncs.clone(),
        );
        registry.register(
            "config_clock_converges",
            "Customers converged because one of their keys expired or ended its grace period",
            config_clock_converges.clone(),
        );
        registry.register(
            "resync_due",
            "Objects the periodic resync found needing a reconcile (no live record, or not Ready at their generation), by kind",
            resync_due.clone(),
        );
        registry.register(
            "object_resyncs",
            "Bulk comparisons of a kind's objects with their records (one per resync interval), by kind",
            object_resyncs.clone(),
        );
        registry.register(
            "fence_divergence",
            "Writer terms found to differ between Postgres and etcd (etcd restored, wiped or its fence key deleted; Postgres restored), counted once each when its healing starts (the term recorded in etcd again, or a start above both); each is healed by converging the etcd prefix from Postgres",
            fence_divergence.clone(),
        );
        let usage_rollup_lag = Gauge::<f64, AtomicU64>::default();
        let usage_rollups_failed = Counter::default();
        let usage_rows_written = Counter::default();
        let usage_threshold_events = Counter::default();
        registry.register_with_unit(
            "usage_rollup_lag",
            "Time since the start of the last completed rollup of the gateways' usage counters into Postgres",
            prometheus_client::registry::Unit::Seconds,
            usage_rollup_lag.clone(),
        );
        registry.register(
            "usage_rollups_failed",
            "Usage rollups that failed (Redis or Postgres error)",
            usage_rollups_failed.clone(),
        );
        registry.register(
            "usage_rows_written",
            "usage_daily rows inserted or changed by the rollup",
            usage_rows_written.clone(),
        );
        registry.register(
            "usage_threshold_events",
            "QuotaThresholdReached events queued",
            usage_threshold_events.clone(),
        );
        registry.register(
            "rows_repaired",
            "Objects whose records a bulk comparison found differing from their plan (edited by hand, or a plan changed while the operator was down) and sent to the reconcile that repairs them, by kind",
            rows_repaired.clone(),
        );
        for key_kind in ["customers", "apikeys", "quotas", "unowned"] {
            let _ = drift_corrections.get_or_create(&KindLabels {
                kind: key_kind.to_owned(),
            });
        }
        Self {
            resource_counters: std::sync::Mutex::default(),
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            resources,
            drift_corrections,
            outbox_backlog,
            outbox_oldest_age,
            events_published,
            outbox_parked,
            outbox_rows_parked,
            stream_group_lag,
            stream_group_pending,
            leader,
            plan_catalog_errors,
            config_keys_written,
            config_resyncs,
            config_clock_converges,
            resync_due,
            object_resyncs,
            fence_divergence,
            usage_rollup_lag,
            usage_rollups_failed,
            usage_rows_written,
            usage_threshold_events,
            rows_repaired,
        }
    }

    /// Creates every series of a kind at zero, so dashboards and alerts see them
    /// before the first event (Prometheus convention).
    pub fn init_kind(&self, kind: &str) {
        let labels = KindLabels {
            kind: kind.to_owned(),
        };
        let _ = self.reconciles.get_or_create(&labels);
        let _ = self.rows_repaired.get_or_create(&labels);
        let _ = self.reconcile_duration.get_or_create(&labels);
        for reason in crate::report::error::Error::METRIC_LABELS {
            let _ = self.reconcile_errors.get_or_create(&ErrorLabels {
                kind: kind.to_owned(),
                reason: (*reason).to_owned(),
            });
        }
    }

    /// Makes `resources{kind}` follow `counter` (read at every scrape).
    pub fn track_resources(
        &self,
        kind: &str,
        counter: impl Fn() -> (i64, i64) + Send + Sync + 'static,
    ) {
        if let Ok(mut counters) = self.resource_counters.lock() {
            counters.push((kind.to_owned(), Box::new(counter)));
        }
    }

    /// Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        if let Ok(counters) = self.resource_counters.lock() {
            for (kind, count) in counters.iter() {
                let (ready, not_ready) = count();
                let gauge = |ready: &str| ReadyLabels {
                    kind: kind.clone(),
                    ready: ready.to_owned(),
                };
                self.resources.get_or_create(&gauge("true")).set(ready);
                self.resources.get_or_create(&gauge("false")).set(not_ready);
            }
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Counts a reconcile and times it until the returned guard drops.
    pub fn reconcile_started(&self, kind: &str) -> ReconcileTimer {
        let labels = KindLabels {
            kind: kind.to_owned(),
        };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.reconcile_duration.get_or_create(&labels).clone(),
        }
    }

    pub fn reconcile_failed(&self, kind: &str, reason: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn config_keys_written(&self, keys: usize) {
        self.config_keys_written
            .inc_by(u64::try_from(keys).unwrap_or(u64::MAX));
    }

    pub fn rows_repaired(&self, kind: &str, objects: usize) {
        self.rows_repaired
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc_by(u64::try_from(objects).unwrap_or(u64::MAX));
    }

    pub fn resync_due(&self, kind: &str, objects: usize) {
        let labels = KindLabels {
            kind: kind.to_owned(),
        };
        self.object_resyncs.get_or_create(&labels).inc();
        self.resync_due
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc_by(u64::try_from(objects).unwrap_or(u64::MAX));
    }

    pub fn drift_corrected(&self, key_kind: &str) {
        self.drift_corrections
            .get_or_create(&KindLabels {
                kind: key_kind.to_owned(),
            })
            .inc();
    }
}

/// Observes the reconcile duration when dropped, whichever way the reconcile ends.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_and_counters_show_in_the_exposition() {
        let m = Metrics::new();
        drop(m.reconcile_started("Customer"));
        m.reconcile_failed("Customer", "database_unavailable");
        let text = m.encode();
        assert!(
            text.contains("m3o_operator_reconciles_total{kind=\"Customer\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("m3o_operator_reconcile_duration_seconds_count{kind=\"Customer\"} 1"),
            "{text}"
        );
        assert!(text.contains("m3o_operator_reconcile_errors_total{kind=\"Customer\",reason=\"database_unavailable\"} 1"), "{text}");
    }
}

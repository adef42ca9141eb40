//! Prometheus metrics of the gateway. No per-customer or per-key labels: usage per
//! customer lives in Redis (`m3o-gateway-auth usage`), not in metric cardinality.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    /// `allowed`, `unauthorized`, `forbidden`, `rate_limited`, `unavailable`.
    pub decision: &'static str,
    /// A fixed reason (`unknown_key`, `blocked`, `scope`, `rate`, `monthly`, ...).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// What the fail mode did with the request: `allowed` or `denied`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub checks: Family<CheckLabels, Counter>,
    pub check_duration: Histogram,
    pub limiter_unavailable: Family<OutcomeLabels, Counter>,
    pub index_entries: Family<KindLabels, Gauge>,
    pub index_revision: Gauge,
    pub index_staleness: Gauge<f64, AtomicU64>,
    pub index_stale: Gauge,
    pub index_relists: Family<CauseLabels, Counter>,
    pub index_invalid_values: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("m3o_gateway");
        let checks = Family::<CheckLabels, Counter>::default();
        let check_duration = Histogram::new(exponential_buckets(0.000_05, 2.0, 14));
        let limiter_unavailable = Family::<OutcomeLabels, Counter>::default();
        let index_entries = Family::<KindLabels, Gauge>::default();
        let index_revision = Gauge::default();
        let index_staleness = Gauge::<f64, AtomicU64>::default();
        let index_stale = Gauge::default();
        let index_relists = Family::<CauseLabels, Counter>::default();
        let index_invalid_values = Counter::default();
        registry.register(
            "checks",
            "Forward-auth checks answered, by decision and reason",
            checks.clone(),
        );
        registry.register_with_unit(
            "check_duration",
            "Time to answer a check",
            Unit::Seconds,
            check_duration.clone(),
        );
        registry.register(
            "limiter_unavailable",
            "Checks decided by the fail mode because Redis did not answer, by outcome",
            limiter_unavailable.clone(),
        );
        registry.register(
            "index_entries",
            "Entries in the in-memory index, by kind",
            index_entries.clone(),
        );
        registry.register(
            "index_revision",
            "etcd revision the index has applied",
            index_revision.clone(),
        );
        registry.register_with_unit(
            "index_staleness",
            "Time since etcd last confirmed the index is current (grows while etcd is unreachable)",
            Unit::Seconds,
            index_staleness.clone(),
        );
        registry.register(
            "index_stale",
            "1 while checks are refused because etcd has not vouched for this replica for --max-staleness (--stale-mode=fail)",
            index_stale.clone(),
        );
        registry.register(
            "index_relists",
            "Full re-lists of the prefix, by cause",
            index_relists.clone(),
        );
        registry.register(
            "index_invalid_values",
            "Values under the prefix the gateway could not read (treated as absent)",
            index_invalid_values.clone(),
        );
        Self {
            registry,
            checks,
            check_duration,
            limiter_unavailable,
            index_entries,
            index_revision,
            index_staleness,
            index_stale,
            index_relists,
            index_invalid_values,
        }
    }

    pub fn check(&self, decision: &'static str, reason: &'static str) {
        self.checks
            .get_or_create(&CheckLabels { decision, reason })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

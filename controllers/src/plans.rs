//! The plan catalog (README, "Configuration"): plan name to default quota.
//!
//! It comes from `--plans-file`, a YAML file (in the chart, a mounted ConfigMap):
//!
//! ```yaml
//! plans:
//!   free:     { monthlyRequests: 10000,    requestsPerSecond: 5 }
//!   pro:      { monthlyRequests: 1000000,  requestsPerSecond: 50 }
//!   business: { monthlyRequests: 10000000, requestsPerSecond: 500 }
//! ```
//!
//! Plan names follow the Subscription's `spec.plan` rule (lowercase DNS label); both
//! quota fields are required and `>= 0`; unknown fields are errors, so a typo fails loudly
//! instead of silently meaning 0. Without a file, [`Catalog::builtin`] (the values above).
//!
//! The file is polled ([`watch_file`]) by content rather than by inotify: a ConfigMap
//! update swaps a symlink, which file watchers see inconsistently. A change replaces the
//! catalog in [`Plans`], whose [`Plans::changes`] stream makes the Subscription controller
//! reconcile every Subscription; a bad edit keeps the previous catalog.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use m3o_crds::Quota;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::report::metrics::Metrics;

/// How often the plans file is re-read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Plan name to default quota.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Catalog {
    plans: BTreeMap<String, Quota>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    plans: BTreeMap<String, PlanDefaults>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PlanDefaults {
    monthly_requests: i64,
    requests_per_second: i32,
}

impl Catalog {
    /// The catalog used when no file is configured.
    pub fn builtin() -> Self {
        let plan = |name: &str, monthly_requests, requests_per_second| {
            let quota = Quota {
                monthly_requests,
                requests_per_second,
            };
            (name.to_owned(), quota)
        };
        Self {
            plans: BTreeMap::from([
                plan("free", 10_000, 5),
                plan("pro", 1_000_000, 50),
                plan("business", 10_000_000, 500),
            ]),
        }
    }

    /// Parses and checks a plans file; the error is one line.
    pub fn parse(yaml: &str) -> Result<Self, String> {
        let file: CatalogFile =
            serde_yaml::from_str(yaml).map_err(|e| e.to_string().replace('\n', " "))?;
        if file.plans.is_empty() {
            return Err("plans: the catalog has no plans".into());
        }
        let mut plans = BTreeMap::new();
        for (name, defaults) in file.plans {
            if !valid_plan_name(&name) {
                return Err(format!(
                    "plans.{name}: a plan name is lowercase letters, digits and '-' (at most 63)"
                ));
            }
            if defaults.monthly_requests < 0 || defaults.requests_per_second < 0 {
                return Err(format!("plans.{name}: quotas must be >= 0"));
            }
            let quota = Quota {
                monthly_requests: defaults.monthly_requests,
                requests_per_second: defaults.requests_per_second,
            };
            plans.insert(name, quota);
        }
        Ok(Self { plans })
    }

    /// The default quota of a plan.
    pub fn get(&self, plan: &str) -> Option<Quota> {
        self.plans.get(plan).copied()
    }

    /// The plan names, sorted, comma separated (for messages).
    pub fn names(&self) -> String {
        self.plans.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// The rule of `spec.plan` in the CRD: a plan the schema admits can be in the catalog.
fn valid_plan_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let inner = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| inner(b) || *b == b'-')
        && bytes.first().is_some_and(inner)
        && bytes.last().is_some_and(inner)
}

/// Reads the catalog at start-up: the file if given, else the built-in one.
pub fn load(path: Option<&Path>) -> Result<Catalog, String> {
    let Some(path) = path else {
        return Ok(Catalog::builtin());
    };
    let yaml = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    Catalog::parse(&yaml)
}

/// The catalog in force, shared by the reconcilers and replaced by [`watch_file`].
#[derive(Clone)]
pub struct Plans {
    current: Arc<watch::Sender<Arc<Catalog>>>,
}

impl Default for Plans {
    fn default() -> Self {
        Self::new(Catalog::builtin())
    }
}

impl Plans {
    pub fn new(catalog: Catalog) -> Self {
        Self {
            current: Arc::new(watch::Sender::new(Arc::new(catalog))),
        }
    }

    /// The catalog in force now.
    pub fn current(&self) -> Arc<Catalog> {
        self.current.borrow().clone()
    }

    /// Replaces the catalog; true when it differs from the one in force.
    pub fn replace(&self, catalog: Catalog) -> bool {
        self.current.send_if_modified(|current| {
            let changed = **current != catalog;
            if changed {
                *current = Arc::new(catalog);
            }
            changed
        })
    }

    /// Yields once after every change of the catalog (not for the one in force now).
    pub fn changes(&self) -> impl Stream<Item = ()> + Send + 'static {
        futures::stream::unfold(self.current.subscribe(), |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })
    }
}

/// Re-reads `path` every [`POLL_INTERVAL`] until `shutdown`, replacing the catalog when
/// the content changes and parses; a bad edit is logged and counted, and the previous
/// catalog stays in force.
pub async fn watch_file(
    plans: Plans,
    path: PathBuf,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut last: Option<Result<Vec<u8>, String>> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
        let read = tokio::fs::read(&path).await.map_err(|e| e.to_string());
        if last.as_ref() == Some(&read) {
            continue;
        }
        last = Some(read.clone());
        let parsed = read.and_then(|bytes| {
            let yaml = String::from_utf8(bytes).map_err(|e| e.to_string())?;
            Catalog::parse(&yaml)
        });
        match parsed {
            Ok(catalog) => {
                let names = catalog.names();
                if plans.replace(catalog) {
                    tracing::info!(path = %path.display(), plans = %names,
                        "plan catalog changed; reconciling every Subscription");
                }
            }
            Err(err) => {
                metrics.plan_catalog_errors.inc();
                tracing::error!(path = %path.display(), %err,
                    "--plans-file: invalid plan catalog; keeping the previous one");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_has_free_pro_business() {
        let c = Catalog::builtin();
        assert_eq!(c.names(), "business, free, pro");
        assert_eq!(
            c.get("free"),
            Some(Quota {
                monthly_requests: 10_000,
                requests_per_second: 5
            })
        );
        assert_eq!(c.get("gold"), None);
    }

    #[test]
    fn a_file_parses() {
        let c = Catalog::parse(
            "plans:\n  free: {monthlyRequests: 1, requestsPerSecond: 2}\n  team-x:\n    monthlyRequests: 0\n    requestsPerSecond: 0\n",
        )
        .expect("valid");
        assert_eq!(c.names(), "free, team-x");
        assert_eq!(c.get("free").map(|q| q.requests_per_second), Some(2));
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        let cases = [
            ("plans: [", "line 1"),
            ("plan: {}", "unknown field `plan`"),
            ("plans: {}", "no plans"),
            (
                "plans: {free: {monthlyRequests: 1}}",
                "missing field `requestsPerSecond`",
            ),
            (
                "plans: {free: {monthlyRequests: 1, requestsPerSecond: 1, burst: 3}}",
                "unknown field `burst`",
            ),
            (
                "plans: {Free: {monthlyRequests: 1, requestsPerSecond: 1}}",
                "plans.Free",
            ),
            (
                "plans: {free: {monthlyRequests: -1, requestsPerSecond: 1}}",
                ">= 0",
            ),
            (
                "plans: {free: {monthlyRequests: x, requestsPerSecond: 1}}",
                "invalid type",
            ),
        ];
        for (yaml, expected) in cases {
            let err = Catalog::parse(yaml).expect_err(yaml);
            assert!(err.contains(expected), "{yaml}: {err}");
            assert!(!err.contains('\n'), "{yaml}: {err}");
        }
    }

    #[test]
    fn replacing_with_an_equal_catalog_is_no_change() {
        let plans = Plans::default();
        assert!(!plans.replace(Catalog::builtin()));
        let other = Catalog::parse("plans: {free: {monthlyRequests: 1, requestsPerSecond: 1}}")
            .expect("valid");
        assert!(plans.replace(other.clone()));
        assert_eq!(*plans.current(), other);
    }
}

//! The admin commands against real servers: `inspect` tells one resource's story across
//! every system, `audit` compares the fleet, and the chart's dashboard and alerts name
//! only series the operator really exports.

mod audit;
mod inspect;
mod monitoring;

use std::process::Output;

use serde_json::Value;
use tokio::process::Command;

use crate::support::TestEnv;

/// Overrides of an admin command's backends.
#[derive(Default)]
pub struct AdminBackends<'a> {
    pub database_url: Option<&'a str>,
    pub redis_url: Option<&'a str>,
}

impl TestEnv {
    /// Runs `m3o-operator ARGS` on this test's schema and prefixes.
    pub async fn admin(&self, args: &[&str], backends: &AdminBackends<'_>) -> Output {
        Command::new(env!("CARGO_BIN_EXE_m3o-operator"))
            .args(args)
            // By environment, so that a test can pass another schema with the flag.
            .env("M3O_DATABASE_SCHEMA", &self.schema)
            .args(["--stream-prefix", &self.stream_prefix])
            .args(["--etcd-prefix", &self.etcd_prefix])
            .env(
                "DATABASE_URL",
                backends.database_url.unwrap_or(&self.database_url),
            )
            .env("REDIS_URL", backends.redis_url.unwrap_or(&self.redis_url))
            .env("ETCD_ENDPOINTS", &self.etcd_endpoints)
            .output()
            .await
            .expect("run m3o-operator")
    }

    /// `inspect KIND NAME -n <ns> -o json`, asserting success; the parsed report.
    pub async fn inspect_json(
        &self,
        kind: &str,
        name: &str,
        backends: &AdminBackends<'_>,
    ) -> Value {
        let out = self
            .admin(
                &["inspect", kind, name, "-n", &self.ns, "-o", "json"],
                backends,
            )
            .await;
        assert!(
            out.status.success(),
            "inspect {kind} {name}: {}",
            text(&out)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("inspect -o json is JSON ({e}): {}", text(&out)))
    }

    /// `inspect KIND NAME -n <ns>` (human output), asserting success.
    pub async fn inspect_text(&self, kind: &str, name: &str) -> String {
        let out = self
            .admin(
                &["inspect", kind, name, "-n", &self.ns],
                &AdminBackends::default(),
            )
            .await;
        assert!(
            out.status.success(),
            "inspect {kind} {name}: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `value` under `<prefix>/<relative>` by hand, as an admin with etcdctl would.
    pub async fn etcd_put(&self, relative: &str, value: &str) {
        self.etcd
            .kv_client()
            .put(format!("{}/{relative}", self.etcd_prefix), value, None)
            .await
            .expect("etcd put");
    }
}

pub use crate::support::cli::text;

/// The entry of `key` (absolute) in an inspect report's etcd section.
pub fn etcd_entry<'a>(report: &'a Value, key: &str) -> &'a Value {
    report["etcd"]
        .as_array()
        .and_then(|entries| entries.iter().find(|e| e["key"] == key))
        .unwrap_or_else(|| panic!("no etcd entry {key} in {report:#}"))
}

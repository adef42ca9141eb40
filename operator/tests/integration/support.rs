//! Test harness: one isolated slice of the shared environment per test (namespace,
//! database schema, stream prefix, etcd prefix) and a real operator process on it.
//!
//! The servers come from `hack/env.sh` (`make test`); a test run without them fails
//! with a message saying so, it never passes silently.

use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use m3o_controllers::store::{self, customers::CustomerRow};
use m3o_crds::Customer;
use m3o_events::consumer::{DecodedEvent, read_all};
use sqlx::PgPool;
use tokio::process::{Child, Command};

pub fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: integration tests need the real servers; run them with `make test` (or inside `hack/env.sh run -- ...`)")
    })
}

/// A short random suffix for names.
pub fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `probe` until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Backends an operator uses instead of the shared ones.
#[derive(Default)]
pub struct Backends {
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    pub etcd_endpoints: Option<String>,
    /// More `run` flags (e.g. `--plans-file`).
    pub extra_args: Vec<String>,
    /// More environment variables (e.g. `M3O_FAILPOINTS`).
    pub extra_env: Vec<(String, String)>,
}

/// One test's slice of the environment.
pub struct TestEnv {
    pub kube: Client,
    pub db: PgPool,
    pub ns: String,
    pub schema: String,
    pub stream_prefix: String,
    pub etcd_prefix: String,
    pub database_url: String,
    pub redis_url: String,
    pub etcd_endpoints: String,
    pub etcd: etcd_client::Client,
}

impl TestEnv {
    pub async fn new(name: &str) -> Self {
        let database_url = required_env("DATABASE_URL");
        let redis_url = required_env("REDIS_URL");
        let etcd_endpoints = required_env("ETCD_ENDPOINTS");
        required_env("KUBECONFIG");
        let id = suffix();
        let ns = format!("{name}-{id}");
        let schema = format!("t_{}_{id}", name.replace('-', "_"));
        let kube = Client::try_default()
            .await
            .expect("kube client from KUBECONFIG");
        let namespaces: Api<Namespace> = Api::all(kube.clone());
        let namespace: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))
                .expect("namespace");
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create namespace");
        let db = store::connect(&database_url, &schema, 5)
            .await
            .expect("connect to DATABASE_URL");
        store::migrate(&db).await.expect("migrate test schema");
        let etcd =
            etcd_client::Client::connect(etcd_endpoints.split(',').collect::<Vec<_>>(), None)
                .await
                .expect("connect to ETCD_ENDPOINTS");
        Self {
            kube,
            db,
            stream_prefix: format!("t-{id}:"),
            etcd_prefix: format!("/t-{id}"),
            ns,
            schema,
            database_url,
            redis_url,
            etcd_endpoints,
            etcd,
        }
    }

    pub fn customers(&self) -> Api<Customer> {
        Api::namespaced(self.kube.clone(), &self.ns)
    }

    /// Starts an operator process watching this test's namespace.
    pub async fn start_operator(&self) -> Operator {
        self.start_operator_with(Backends::default()).await
    }

    /// Starts an operator process with some backends replaced (for outage tests).
    pub async fn start_operator_with(&self, backends: Backends) -> Operator {
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("operator-logs");
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let log_path = log_dir.join(format!("{}.log", self.ns));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log file");
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(env!("CARGO_BIN_EXE_m3o-operator"))
            .args([
                "run",
                "--namespace",
                &self.ns,
                "--database-schema",
                &self.schema,
            ])
            .args([
                "--stream-prefix",
                &self.stream_prefix,
                "--etcd-prefix",
                &self.etcd_prefix,
            ])
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--resync-interval",
                "30s",
                "--log-format",
                "json",
            ])
            .args(&backends.extra_args)
            .envs(backends.extra_env.iter().map(|(k, v)| (k, v)))
            .env(
                "DATABASE_URL",
                backends.database_url.as_ref().unwrap_or(&self.database_url),
            )
            .env(
                "REDIS_URL",
                backends.redis_url.as_ref().unwrap_or(&self.redis_url),
            )
            .env(
                "ETCD_ENDPOINTS",
                backends
                    .etcd_endpoints
                    .as_ref()
                    .unwrap_or(&self.etcd_endpoints),
            )
            .env("RUST_LOG", "info,m3o_controllers=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn m3o-operator");
        let port = bound_port(&log_path, log_start).await;
        let op = Operator {
            child,
            port,
            log_path,
        };
        op.wait_ready().await;
        op
    }

    /// Creates or updates a Customer the way `kubectl apply --server-side` does.
    pub async fn apply_customer(&self, name: &str, spec: serde_json::Value) -> Customer {
        let body = serde_json::json!({
            "apiVersion": "m3o.com/v1alpha1", "kind": "Customer",
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec,
        });
        self.customers()
            .patch(
                name,
                &PatchParams::apply("integration-test").force(),
                &Patch::Apply(&body),
            )
            .await
            .unwrap_or_else(|e| panic!("apply customer {name}: {e}"))
    }

    /// Waits until the Customer's Ready condition has `status` and `reason` for its
    /// current generation, and returns it.
    pub async fn wait_customer(&self, name: &str, status: &str, reason: &str) -> Customer {
        let api = self.customers();
        eventually(
            &format!("customer {name} Ready={status} ({reason})"),
            Duration::from_secs(60),
            || async {
                let c = api.get_opt(name).await.ok()??;
                let s = c.status.as_ref()?;
                let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?;
                let current = s.observed_generation == c.metadata.generation;
                (current && ready.status == status && ready.reason == reason).then_some(c)
            },
        )
        .await
    }

    pub async fn wait_ready(&self, name: &str) -> Customer {
        self.wait_customer(name, "True", "Provisioned").await
    }

    /// The live row of a Customer.
    pub async fn row(&self, name: &str) -> Option<CustomerRow> {
        store::customers::live_by_k8s_ref(&self.db, &self.ns, name)
            .await
            .expect("query customers")
    }

    /// Any row (live or deleted) by id.
    pub async fn row_by_id(&self, id: &str) -> CustomerRow {
        sqlx::query_as("SELECT * FROM customers WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&self.db)
            .await
            .expect("customer row")
    }

    /// Value under `<prefix>/<relative>` in etcd, parsed as JSON.
    pub async fn etcd_json(&self, relative: &str) -> Option<serde_json::Value> {
        let resp = self
            .etcd
            .kv_client()
            .get(format!("{}/{relative}", self.etcd_prefix), None)
            .await
            .expect("etcd get");
        resp.kvs()
            .first()
            .map(|kv| serde_json::from_slice(kv.value()).expect("etcd value is JSON"))
    }

    /// Revision at which a key was last modified (0 when absent).
    pub async fn etcd_mod_revision(&self, relative: &str) -> i64 {
        let resp = self
            .etcd
            .kv_client()
            .get(format!("{}/{relative}", self.etcd_prefix), None)
            .await
            .expect("etcd get");
        resp.kvs().first().map_or(0, |kv| kv.mod_revision())
    }

    /// Every key under this test's etcd prefix.
    pub async fn etcd_keys(&self) -> Vec<String> {
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_keys_only();
        let resp = self
            .etcd
            .kv_client()
            .get(format!("{}/", self.etcd_prefix), Some(options))
            .await
            .expect("etcd list");
        resp.kvs()
            .iter()
            .map(|kv| kv.key_str().expect("utf-8 key").to_owned())
            .collect()
    }

    /// Every decoded entry of this test's `customers` stream.
    pub async fn stream_events(&self) -> Vec<DecodedEvent> {
        self.stream_events_at(&self.redis_url).await
    }

    pub async fn stream_events_at(&self, redis_url: &str) -> Vec<DecodedEvent> {
        let client = redis::Client::open(redis_url).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        let key = m3o_events::stream_key(&self.stream_prefix, m3o_events::customers::TOPIC);
        read_all(&mut conn, &key).await.expect("read stream")
    }

    /// Waits until the stream holds `n` distinct events and returns them (deduplicated by id).
    pub async fn wait_events(&self, n: usize) -> Vec<DecodedEvent> {
        eventually(
            &format!("{n} events on the stream"),
            Duration::from_secs(30),
            || async {
                let events = dedupe(self.stream_events().await);
                (events.len() >= n).then_some(events)
            },
        )
        .await
    }

    pub async fn outbox_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.db)
            .await
            .expect("count outbox")
    }
}

/// The port an operator started at `log_start` in `log_path` bound (it binds port 0).
async fn bound_port(log_path: &std::path::Path, log_start: u64) -> u16 {
    let what = format!("the operator's HTTP address in {}", log_path.display());
    eventually(&what, Duration::from_secs(60), || async {
        let log = std::fs::read(log_path).ok()?;
        let new = String::from_utf8_lossy(log.get(log_start as usize..)?).into_owned();
        assert!(
            !new.contains("m3o-operator: error:"),
            "the operator failed to start:\n{new}"
        );
        let line = new.lines().find(|l| l.contains("HTTP server listening"))?;
        let addr = serde_json::from_str::<serde_json::Value>(line).ok()?["addr"]
            .as_str()?
            .to_owned();
        addr.rsplit_once(':')?.1.parse().ok()
    })
    .await
}

/// Drops re-sent entries (at-least-once delivery): consumers dedupe by event id.
pub fn dedupe(events: Vec<DecodedEvent>) -> Vec<DecodedEvent> {
    let mut seen = std::collections::HashSet::new();
    events.into_iter().filter(|e| seen.insert(e.id)).collect()
}

/// A running `m3o-operator run` process; killed when dropped.
pub struct Operator {
    child: Child,
    pub port: u16,
    pub log_path: PathBuf,
}

impl Operator {
    pub async fn wait_ready(&self) {
        let url = format!("127.0.0.1:{}", self.port);
        let log = self.log_path.clone();
        eventually(
            &format!("operator /readyz (log: {})", log.display()),
            Duration::from_secs(60),
            || async {
                http_get(&url, "/readyz")
                    .await
                    .filter(|(code, _)| *code == 200)
                    .map(|_| ())
            },
        )
        .await;
    }

    pub async fn metrics(&self) -> String {
        http_get(&format!("127.0.0.1:{}", self.port), "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// Waits until no reconcile has run for a second (trailing reconciles of earlier
    /// changes would otherwise race a test's next step).
    pub async fn settle(&self) {
        let total = |m: String| -> f64 {
            m.lines()
                .filter(|l| l.starts_with("m3o_operator_reconciles_total"))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut last = total(self.metrics().await);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = total(self.metrics().await);
            if now == last {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the operator did not settle in 30s"
            );
            last = now;
        }
    }

    /// Waits for the process to exit on its own.
    pub async fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().await.expect("wait operator")
    }

    /// SIGKILL: no chance to clean up, as in a node failure.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill operator");
    }

    /// SIGTERM and wait: the graceful path.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running operator").to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("send SIGTERM");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("operator stops within 30s of SIGTERM")
            .expect("wait operator")
    }
}

/// A minimal HTTP/1.0 GET, enough for the operator's own endpoints.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}

/// A private redis-server on a free port, for tests that take Redis down.
pub struct PrivateRedis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let port = free_port();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut redis = Self {
            child: None,
            port,
            dir,
        };
        redis.resume().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port.
    pub async fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (install redis-server; `make test` does)");
        self.child = Some(child);
        let url = self.url();
        eventually(
            "private redis to answer",
            Duration::from_secs(10),
            || async {
                let client = redis::Client::open(url.as_str()).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
            },
        )
        .await;
    }

    /// Kills the server (its data is gone: it keeps nothing on disk).
    pub async fn pause(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis");
        }
    }
}

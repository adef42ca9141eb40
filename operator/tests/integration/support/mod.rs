//! Test harness: one isolated slice of the shared environment per test (namespace,
//! database schema, stream prefix, etcd prefix) and a real operator process on it.
//!
//! The servers come from `hack/env.sh` (`make test`); a test run without them fails
//! with a message saying so, it never passes silently.

pub mod batch;
pub mod cli;
pub mod gateway;
pub mod kubeconfig;
pub mod nginx;
pub mod operator;
pub mod private_etcd;
pub mod private_redis;
pub mod proxy;
pub mod tls_backends;

pub use operator::{Backends, Operator, exit_log, http_get};
pub use private_etcd::PrivateEtcd;
pub use private_redis::PrivateRedis;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use m3o_controllers::store::{self, customers::CustomerRow};
use m3o_crds::Customer;
use m3o_events::consumer::{DecodedEvent, read_all};
use sqlx::PgPool;

pub fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: integration tests need the real servers; run them with `make test` (or inside `hack/env.sh run -- ...`)")
    })
}

/// Waits until `client` connects and Redis answers PING.
pub async fn wait_redis_answers(what: &str, timeout: Duration, client: &redis::Client) {
    eventually(what, timeout, || async {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    })
    .await;
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

/// Drops re-sent entries (at-least-once delivery): consumers dedupe by event id.
pub fn dedupe(events: Vec<DecodedEvent>) -> Vec<DecodedEvent> {
    let mut seen = std::collections::HashSet::new();
    events.into_iter().filter(|e| seen.insert(e.id)).collect()
}

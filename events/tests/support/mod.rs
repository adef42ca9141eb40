//! Test environment: real Postgres and Redis, one schema and stream prefix per test.
//!
//! `DATABASE_URL` and `REDIS_URL` must point at running servers (`make test` /
//! `hack/env.sh` start them); a missing variable fails the test, it never passes silently.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::future::Future;
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use m3o_events::consumer::{self, DecodedEvent};
use m3o_events::customers::{Customer, Event, EventType};
use m3o_events::outbox::{self, OutboxMessage};
use m3o_events::relay::{ParkedEvent, Relay, RelayConfig, RelayStats};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The value of environment variable `name`, or a panic saying how to get it.
pub fn env_url(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{name} not set: run via `make test` / hack/env.sh (needs real servers)"),
    }
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// A fresh schema with the migrations applied, and a pool whose `search_path` is it.
pub struct TestDb {
    admin: PgPool,
    /// Pool of connections with `search_path` = `schema`.
    pub pool: PgPool,
    /// The schema name (random).
    pub schema: String,
}

impl TestDb {
    /// Creates the schema and runs `migrations/` in it.
    pub async fn new() -> Self {
        let url = env_url("DATABASE_URL");
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connecting to DATABASE_URL failed: {e}"));
        let schema = format!("evtest_{}", Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&admin)
            .await
            .expect("CREATE SCHEMA");
        let options = PgConnectOptions::from_str(&url)
            .expect("DATABASE_URL parses")
            .options([("search_path", schema.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .expect("connect with search_path");
        sqlx::migrate!("../migrations")
            .run(&pool)
            .await
            .expect("migrations apply");
        Self {
            admin,
            pool,
            schema,
        }
    }

    /// Drops the schema (call at the end of a passing test).
    pub async fn cleanup(self) {
        self.pool.close().await;
        let _ = sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .execute(&self.admin)
            .await;
    }

    /// A second pool on the schema whose connections carry `application_name` = `name`
    /// (so a test can find them in `pg_stat_activity`).
    pub async fn pool_named(&self, name: &str) -> PgPool {
        let url = env_url("DATABASE_URL");
        let options = PgConnectOptions::from_str(&url)
            .expect("DATABASE_URL parses")
            .options([("search_path", self.schema.as_str())])
            .application_name(name);
        PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .expect("connect with application_name")
    }

    /// Enqueues each event in its own committed transaction; returns the event ids.
    pub async fn enqueue_committed(&self, events: &[(String, Event)]) -> Vec<Uuid> {
        let mut ids = Vec::new();
        for (aggregate, event) in events {
            let mut tx = self.pool.begin().await.expect("begin");
            let msg = OutboxMessage::from_event(aggregate.clone(), event);
            ids.push(outbox::enqueue(&mut tx, &msg).await.expect("enqueue"));
            tx.commit().await.expect("commit");
        }
        ids
    }
}

/// A customers event of type `ty` about customer `id`.
pub fn customer_event(id: &str, ty: EventType, n: i64) -> (String, Event) {
    let event = Event {
        r#type: ty as i32,
        customer: Some(Customer {
            id: id.to_owned(),
            status: "active".into(),
            created: 1_700_000_000 + n,
            email: format!("{id}@example.com"),
            updated: 1_700_000_000 + n,
            name: format!("customer {n}"),
            meta: [("n".to_owned(), n.to_string())].into(),
        }),
        ..Default::default()
    };
    (id.to_owned(), event)
}

/// A unique stream prefix, so tests sharing one Redis never see each other's entries.
pub fn stream_prefix() -> String {
    format!("evtest:{}:", Uuid::new_v4().simple())
}

/// The relay configuration of the tests: small batches, fast backoff.
pub fn test_config(db: &TestDb, prefix: &str, fallback: Duration) -> RelayConfig {
    let mut config = RelayConfig::new(db.schema.clone());
    config.stream_prefix = prefix.to_owned();
    config.fallback_interval = fallback;
    config.batch_size = 7;
    config.backoff_min = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(500);
    config
}

/// A relay on `pool` publishing to `redis_url`, not running.
pub fn relay(pool: &PgPool, redis_url: &str, config: RelayConfig) -> Relay {
    let client = redis::Client::open(redis_url).expect("redis url parses");
    Relay::new(pool.clone(), client, config).expect("relay")
}

/// A running relay task.
pub struct RunningRelay {
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// The relay's counters.
    pub stats: Arc<RelayStats>,
    /// Rows the relay parked.
    pub parked: mpsc::Receiver<ParkedEvent>,
}

impl RunningRelay {
    /// Starts a relay on `db` publishing to `redis_url` with [`test_config`].
    pub fn start(db: &TestDb, redis_url: &str, prefix: &str, fallback: Duration) -> Self {
        Self::start_with(db, redis_url, test_config(db, prefix, fallback))
    }

    /// Starts a relay on `db` publishing to `redis_url` with `config`.
    pub fn start_with(db: &TestDb, redis_url: &str, config: RelayConfig) -> Self {
        let mut relay = relay(&db.pool, redis_url, config);
        let parked = relay.parked_events(100);
        let stats = relay.stats();
        let stop = CancellationToken::new();
        let task = tokio::spawn(relay.run(stop.clone()));
        Self {
            stop,
            task,
            stats,
            parked,
        }
    }

    /// Cancels the relay and waits for it to end.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("relay stops within 10 s")
            .expect("relay task did not panic");
    }
}

/// All decoded entries of `key`, on a fresh connection (so it works across restarts).
pub async fn try_read_stream(redis_url: &str, key: &str) -> Result<Vec<DecodedEvent>, String> {
    let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("connecting to {redis_url}: {e}"))?;
    match consumer::read_all(&mut conn, key).await {
        Err(e @ consumer::ConsumerError::Redis { .. }) => Err(e.to_string()),
        other => Ok(other.expect("stream entries decode")),
    }
}

/// All decoded entries of `key`; panics if Redis cannot be read.
pub async fn read_stream(redis_url: &str, key: &str) -> Vec<DecodedEvent> {
    try_read_stream(redis_url, key)
        .await
        .unwrap_or_else(|e| panic!("reading stream {key}: {e}"))
}

/// Polls the stream until it has at least `n` entries or `timeout` passes.
pub async fn wait_for_entries(
    redis_url: &str,
    key: &str,
    n: usize,
    timeout: Duration,
) -> Vec<DecodedEvent> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = try_read_stream(redis_url, key).await;
        match last {
            Ok(entries) if entries.len() >= n => return entries,
            _ if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(entries) => panic!(
                "stream {key} did not reach {n} entries within {timeout:?} (has {})",
                entries.len()
            ),
            Err(e) => panic!(
                "stream {key} did not reach {n} entries within {timeout:?} (last read failed: {e})"
            ),
        }
    }
}

/// Calls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A private `redis-server` child on a fixed free port, that a test may kill and restart.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` (no persistence) on a free loopback port.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut server = Self { port, child: None };
        server.restart().await;
        server
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis-server");
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub async fn pause(&self) {
        self.signal("-STOP").await;
    }

    /// Thaws a paused server (SIGCONT).
    pub async fn resume(&self) {
        self.signal("-CONT").await;
    }

    async fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("redis-server running");
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts the server again on the same port and waits until it answers PING.
    pub async fn restart(&mut self) {
        self.kill().await;
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting redis-server failed (is it installed?): {e}"));
        self.child = Some(child);
        let url = self.url();
        let up = poll_until(Duration::from_secs(10), || async {
            let client = redis::Client::open(url.as_str()).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        })
        .await;
        assert!(
            up.is_some(),
            "redis-server on port {} did not start",
            self.port
        );
    }
}

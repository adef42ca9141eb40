//! A partitioned replica: two replicas, one reaching etcd through a TCP proxy that is
//! then frozen (like a SIGSTOPped process: connections stay open, no FIN, nothing
//! passes). After `blocked: true`, `GatewaySynced=True` must mean that neither replica
//! accepts the key; under `--stale-mode=serve` the frozen replica does, says so in its
//! report, and the condition is never True.

use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use m3o_crds::ApiKey;
use m3o_gateway::Gateway;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{issue, wait_gateway_synced};
use crate::support::gateway::check;
use crate::support::proxy::host_port;
use crate::support::{TestEnv, eventually, http_get};

const PATH: &str = "/v1/helloworld/Call";

/// A TCP proxy that can freeze: every connection stays open but carries nothing more
/// either way, and new ones are accepted and held, as with a SIGSTOPped proxy process.
struct FreezableProxy {
    port: u16,
    frozen: watch::Sender<bool>,
}

impl FreezableProxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let (frozen, _) = watch::channel(false);
        let gate = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, gate.subscribe()));
                tokio::spawn(pump(server_read, client_write, gate.subscribe()));
            }
        });
        Self { port, frozen }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

/// Copies `from` to `to` while not frozen; frozen, it holds both ends open.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Replica `a` straight to etcd, replica `b` through a freezable proxy; both without
/// limits (this is about the index, not Redis) and with `args`, `b` also with `b_args`.
async fn replicas(
    env: &TestEnv,
    args: &[&str],
    b_args: &[&str],
) -> (Gateway, FreezableProxy, Gateway) {
    let mut config = env.gateway_config();
    config.extra_args = vec!["--no-limits".into()];
    config.extra_args.extend(args.iter().map(|s| s.to_string()));
    let a = env.start_gateway(&config).await;
    let etcd = env
        .etcd_endpoints
        .split(',')
        .next()
        .expect("endpoint")
        .to_owned();
    let proxy = FreezableProxy::start(host_port(&etcd)).await;
    config.etcd_endpoints = format!("http://127.0.0.1:{}", proxy.port);
    config
        .extra_args
        .extend(b_args.iter().map(|s| s.to_string()));
    let b = env.start_gateway(&config).await;
    (a, proxy, b)
}

/// Waits until both replicas report, b in serve mode (it registers just after its first
/// list, which is all a serve-mode /readyz waits for).
async fn serve_mode_reported(env: &TestEnv) {
    eventually(
        "b to report staleMode serve",
        Duration::from_secs(30),
        || async {
            let value = reports(env).await;
            (value.len() == 2 && value.iter().any(|r| r["staleMode"] == "serve")).then_some(())
        },
    )
    .await;
}

async fn block(env: &TestEnv, name: &str) {
    env.apikeys()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"blocked": true}})),
        )
        .await
        .expect("block the key");
}

fn is_blocked(k: &ApiKey) -> bool {
    k.status
        .as_ref()
        .and_then(|s| s.state)
        .map(|s| format!("{s:?}"))
        == Some("Blocked".into())
}

/// The replicas' reports under the test's prefix (replica id -> JSON).
async fn reports(env: &TestEnv) -> Vec<serde_json::Value> {
    let resp = env
        .etcd
        .kv_client()
        .get(
            format!("{}/gateways/", env.etcd_prefix),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("list reports");
    resp.kvs()
        .iter()
        .map(|kv| serde_json::from_slice(kv.value()).expect("report JSON"))
        .collect()
}

#[tokio::test]
async fn a_frozen_replica_stops_serving_before_gateway_synced_says_true() {
    let env = TestEnv::new("gw-partition").await;
    let _operator = env.start_operator().await;
    let (key, _) = issue(
        &env,
        "pat",
        "pat-key",
        &["helloworld"],
        json!({"requestsPerSecond": 1000, "monthlyRequests": 1_000_000}),
    )
    .await;
    // b's bound is above its lease's 10 s, so its report vanishes before it stops
    // serving: only counting it for its bound after it left keeps True honest.
    let (a, proxy, b) = replicas(&env, &[], &["--max-staleness=15s"]).await;
    let (_, _, message) = wait_gateway_synced(&env, "pat-key", |k, s, _| {
        s == "True"
            && k.status
                .iter()
                .flat_map(|s| &s.conditions)
                .any(|c| c.type_ == "GatewaySynced" && c.message.starts_with("2/2 "))
    })
    .await;
    assert!(message.starts_with("2/2 "), "{message}");
    for r in [&a, &b] {
        let reply = check(r, &key, PATH).await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let value = reports(&env).await;
    assert!(
        value.iter().all(|r| r.get("staleMode").is_none())
            && value.iter().any(|r| r["maxStalenessSeconds"] == 10)
            && value.iter().any(|r| r["maxStalenessSeconds"] == 15),
        "{value:?}"
    );

    // The happy path (every replica reporting) does not wait for any bound: a change
    // of the key's entry is confirmed as soon as both have applied it.
    let changed_at = Instant::now();
    env.apikeys()
        .patch(
            "pat-key",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"scopes": ["helloworld", "weather"]}})),
        )
        .await
        .expect("change the key's scopes");
    let (_, _, message) = wait_gateway_synced(&env, "pat-key", |_, s, _| s == "True").await;
    let happy = changed_at.elapsed();
    assert!(message.starts_with("2/2 "), "{message}");
    assert!(
        happy < Duration::from_secs(10),
        "GatewaySynced took {happy:?} with every replica reporting"
    );
    eprintln!(
        "happy path: GatewaySynced True {:.2}s after the change",
        happy.as_secs_f64()
    );

    // b is cut off without a FIN; then the key is blocked.
    proxy.freeze();
    let frozen_at = Instant::now();
    block(&env, "pat-key").await;
    let (_, reason, message) =
        wait_gateway_synced(&env, "pat-key", |k, s, _| s == "True" && is_blocked(k)).await;
    let synced_after = frozen_at.elapsed();
    // The moment it says True, neither replica accepts the key: a has applied the
    // block, b refuses everything (its snapshot is past --max-staleness).
    let (from_a, from_b) = (check(&a, &key, PATH).await, check(&b, &key, PATH).await);
    assert_eq!(from_a.status, 401, "{from_a:?}");
    assert!(
        from_b.status == 503 || from_b.status == 401,
        "GatewaySynced True ({reason}: {message}) after {synced_after:?}, but the frozen replica answered {from_b:?}"
    );
    if from_b.status == 503 {
        assert!(from_b.body.contains("index_stale"), "{from_b:?}");
        assert!(from_b.header("Retry-After").is_some(), "{from_b:?}");
    }
    let ready = http_get(&b.metrics_addr.to_string(), "/readyz").await;
    assert!(
        ready
            .as_ref()
            .is_some_and(|(code, body)| *code == 503 && body.contains("index_stale")),
        "{ready:?}"
    );
    assert!(message.starts_with("1/1 "), "{message}");
    eprintln!(
        "partition: GatewaySynced True {:.1}s after the freeze ({message}); frozen replica: {} {}",
        synced_after.as_secs_f64(),
        from_b.status,
        from_b.body
    );

    // Thawed, b confirms its index again and applies the block.
    proxy.thaw();
    eventually(
        "the thawed replica to refuse the key with 401",
        Duration::from_secs(30),
        || async { (check(&b, &key, PATH).await.status == 401).then_some(()) },
    )
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_frozen_replica_in_serve_mode_keeps_serving_and_voids_gateway_synced() {
    let env = TestEnv::new("gw-partition-serve").await;
    let _operator = env.start_operator().await;
    let (key, _) = issue(
        &env,
        "sam",
        "sam-key",
        &["helloworld"],
        json!({"requestsPerSecond": 1000, "monthlyRequests": 1_000_000}),
    )
    .await;
    let (a, proxy, b) = replicas(&env, &[], &["--stale-mode=serve"]).await;
    // b's report says so, and that alone keeps the condition from True.
    serve_mode_reported(&env).await;
    let (_, _, message) = wait_gateway_synced(&env, "sam-key", |_, s, r| {
        s == "False" && r == "StaleModeServe"
    })
    .await;
    assert!(message.contains("--stale-mode=serve"), "{message}");

    proxy.freeze();
    block(&env, "sam-key").await;
    eventually(
        "replica a to refuse the blocked key",
        Duration::from_secs(30),
        || async { (check(&a, &key, PATH).await.status == 401).then_some(()) },
    )
    .await;
    // b's report vanishes with its lease; it goes on serving its snapshot.
    eventually(
        "the frozen replica's report to vanish",
        Duration::from_secs(30),
        || async { (reports(&env).await.len() == 1).then_some(()) },
    )
    .await;
    let served_from = Instant::now();
    let from_b = check(&b, &key, PATH).await;
    assert_eq!(from_b.status, 200, "{from_b:?}");
    let ready = http_get(&b.metrics_addr.to_string(), "/readyz").await;
    assert!(
        ready.as_ref().is_some_and(|(code, _)| *code == 200),
        "{ready:?}"
    );
    // The operator has seen b leave, and still does not say True...
    let (status, reason, message) = wait_gateway_synced(&env, "sam-key", |k, _, _| {
        is_blocked(k)
            && k.status
                .iter()
                .flat_map(|s| &s.conditions)
                .any(|c| c.type_ == "GatewaySynced" && c.message.contains("has stopped reporting"))
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "StaleModeServe"),
        "{message}"
    );
    // ... nor once b's --max-staleness (10 s) has passed since it left: a replica in
    // serve mode may serve its snapshot for ever. (A property over time: checked
    // throughout the bound and a margin, not waited for.)
    let until = served_from + Duration::from_secs(12);
    while Instant::now() < until {
        let k = env.apikeys().get("sam-key").await.expect("apikey");
        let c = k
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .find(|c| c.type_ == "GatewaySynced")
            .expect("GatewaySynced");
        assert_ne!(c.status, "True", "{c:?}");
        assert_eq!(check(&b, &key, PATH).await.status, 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "partition (serve): frozen replica still 200 {:.1}s after its report vanished; {reason}: {message}",
        served_from.elapsed().as_secs_f64()
    );
    proxy.thaw();
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn after_a_restart_the_operator_waits_a_bound_for_replicas_it_never_saw_leave() {
    let env = TestEnv::new("gw-partition-restart").await;
    let operator = env.start_operator().await;
    let (key, _) = issue(
        &env,
        "rio",
        "rio-key",
        &["helloworld"],
        json!({"requestsPerSecond": 1000, "monthlyRequests": 1_000_000}),
    )
    .await;
    // Bounds well above the 10 s lease: b serves its snapshot long after its report
    // has vanished.
    let (a, proxy, b) = replicas(&env, &["--max-staleness=25s"], &[]).await;
    eventually(
        "both replicas to report",
        Duration::from_secs(30),
        || async { (reports(&env).await.len() == 2).then_some(()) },
    )
    .await;
    wait_gateway_synced(&env, "rio-key", |_, s, _| s == "True").await;

    // No operator sees b leave: it is stopped, b is frozen, b's report vanishes.
    operator.kill().await;
    proxy.freeze();
    let frozen_at = Instant::now();
    eventually(
        "the frozen replica's report to vanish",
        Duration::from_secs(30),
        || async { (reports(&env).await.len() == 1).then_some(()) },
    )
    .await;
    assert_eq!(check(&b, &key, PATH).await.status, 200, "b still serves");
    let _operator = env.start_operator().await;
    let started = Instant::now();
    block(&env, "rio-key").await;
    let (_, reason, message) =
        wait_gateway_synced(&env, "rio-key", |k, s, _| s == "True" && is_blocked(k)).await;
    let from_b = check(&b, &key, PATH).await;
    assert!(
        from_b.status == 503 || from_b.status == 401,
        "GatewaySynced True ({reason}: {message}) {:?} after the restart, but the frozen replica answered {from_b:?}",
        started.elapsed()
    );
    assert_eq!(check(&a, &key, PATH).await.status, 401);
    eprintln!(
        "restart: GatewaySynced True {:.1}s after the new operator started ({:.1}s after the freeze): {message}",
        started.elapsed().as_secs_f64(),
        frozen_at.elapsed().as_secs_f64()
    );
    proxy.thaw();
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_serve_mode_replica_that_shut_down_gracefully_no_longer_voids_gateway_synced() {
    let env = TestEnv::new("gw-stopped-serve").await;
    let _operator = env.start_operator().await;
    let (key, _) = issue(
        &env,
        "sue",
        "sue-key",
        &["helloworld"],
        json!({"requestsPerSecond": 1000, "monthlyRequests": 1_000_000}),
    )
    .await;
    let (a, _proxy, b) = replicas(&env, &[], &["--stale-mode=serve"]).await;
    serve_mode_reported(&env).await;
    wait_gateway_synced(&env, "sue-key", |_, s, r| {
        s == "False" && r == "StaleModeServe"
    })
    .await;
    // The SIGTERM path (main.rs: drain, then stop), with no delay: b says it stopped,
    // then revokes its report. Without the "stopped" report the operator would count
    // b (no bound) for ever and the key would stay StaleModeServe.
    b.drain(Duration::ZERO).await;
    assert_eq!(reports(&env).await.len(), 1, "b's report is revoked");
    let (status, reason, message) =
        wait_gateway_synced(&env, "sue-key", |_, s, _| s == "True").await;
    assert_eq!(reason, "Synced", "{message}");
    assert!(message.starts_with("1/1"), "{status} {message}");
    assert_eq!(check(&a, &key, PATH).await.status, 200);
    a.stop().await;
}

//! Gateway benchmarks (`make bench-gateway`, release build): figures printed, nothing
//! asserted beyond the setup working. Ignored in the normal suite.
//!
//! - checks per second and p50/p99 latency against one replica with 10,000 keys
//!   loaded, with the Redis limit (GCRA + monthly + usage script per check) and
//!   without (`--no-limits`);
//! - revocation latency: an ApiKey patched to `blocked: true` (the PATCH kubectl
//!   sends) until the first 401 through nginx, over 100 tries at rest.

use std::time::{Duration, Instant};

use etcd_client::{Txn, TxnOp};
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::{issue, through};
use crate::support::gateway::{CheckLoop, start_upstream};
use crate::support::nginx::Nginx;
use crate::support::{TestEnv, eventually, http_get};

const KEYS: usize = 10_000;
const CONNECTIONS: usize = 32;
const RUN: Duration = Duration::from_secs(5);

/// Writes `KEYS` keys (10 per customer, each customer with a generous quota) straight
/// into the test's prefix; returns the plaintext keys.
async fn load_keys(env: &TestEnv) -> Vec<String> {
    let mut kv = env.etcd.kv_client();
    let mut keys = Vec::with_capacity(KEYS);
    let mut ops = Vec::new();
    let p = &env.etcd_prefix;
    let mut customer = uuid::Uuid::new_v4();
    for i in 0..KEYS {
        if i % 10 == 0 {
            customer = uuid::Uuid::new_v4();
            let c = json!({"id": customer.to_string(), "email": format!("b{i}@example.com"), "name": "", "status": "active", "plan": "pro"});
            ops.push(TxnOp::put(
                format!("{p}/{}", m3o_platform_contract::customer_key(customer)),
                c.to_string(),
                None,
            ));
            let q = json!({"plan": "pro", "monthlyRequests": 1_000_000_000_000i64, "requestsPerSecond": 1_000_000});
            ops.push(TxnOp::put(
                format!("{p}/{}", m3o_platform_contract::quota_key(customer)),
                q.to_string(),
                None,
            ));
        }
        // Well formed: the gateway refuses anything else before hashing it.
        let key = crate::support::gateway::new_key();
        let entry = json!({
            "keyId": uuid::Uuid::new_v4().to_string(), "customerId": customer.to_string(),
            "scopes": ["*"], "status": "active", "expiresAt": null,
        });
        ops.push(TxnOp::put(
            format!(
                "{p}/{}",
                m3o_platform_contract::apikey_key(&m3o_controllers::apikey::secret::hash(
                    key.as_bytes()
                ))
            ),
            entry.to_string(),
            None,
        ));
        keys.push(key);
        if ops.len() >= 96 {
            kv.txn(Txn::new().and_then(std::mem::take(&mut ops)))
                .await
                .expect("load keys");
        }
    }
    if !ops.is_empty() {
        kv.txn(Txn::new().and_then(ops)).await.expect("load keys");
    }
    keys
}

/// One keep-alive connection sending checks for random keys until `until`; latencies in µs.
async fn worker(
    addr: String,
    keys: std::sync::Arc<Vec<String>>,
    until: Instant,
    seed: usize,
) -> (Vec<u32>, usize) {
    let mut checks = CheckLoop::connect(&addr, keys, seed).await;
    let mut latencies = Vec::new();
    let mut failures = 0;
    while Instant::now() < until {
        let started = Instant::now();
        let status = checks.next().await;
        latencies.push(started.elapsed().as_micros() as u32);
        if status != 200 {
            failures += 1;
        }
    }
    (latencies, failures)
}

async fn load(addr: &str, keys: &[String], what: &str) {
    let keys = std::sync::Arc::new(keys.to_vec());
    let until = Instant::now() + RUN;
    let started = Instant::now();
    let runs = futures::future::join_all(
        (0..CONNECTIONS)
            .map(|c| tokio::spawn(worker(addr.to_owned(), keys.clone(), until, c * 7919 + 1))),
    )
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut all: Vec<u32> = Vec::new();
    let mut failures = 0;
    for run in runs {
        let (l, f) = run.expect("worker");
        all.extend(l);
        failures += f;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{what:<34} {:>8.0} checks/s  p50 {:>6} µs  p99 {:>6} µs  ({} checks, {failures} not 200, {CONNECTIONS} connections)",
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        all.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_gateway_checks_per_second() {
    let env = TestEnv::new("gw-bench").await;
    let keys = load_keys(&env).await;
    let config = env.gateway_config();
    let limited = env.start_gateway(&config).await;
    let mut plain = config;
    plain.extra_args = vec!["--no-limits".into()];
    let unlimited = env.start_gateway(&plain).await;
    let ops = limited.metrics_addr.to_string();
    eventually(
        "10,000 keys in the index",
        Duration::from_secs(60),
        || async {
            let (_, body) = http_get(&ops, "/metrics").await?;
            body.contains(&format!(
                "m3o_gateway_index_entries{{kind=\"apikeys\"}} {KEYS}"
            ))
            .then_some(())
        },
    )
    .await;
    println!(
        "--- m3o-gateway-auth, {KEYS} keys loaded, {RUN:?} per run, load generator in the same process"
    );
    load(
        &unlimited.addr.to_string(),
        &keys,
        "without Redis (--no-limits)",
    )
    .await;
    load(
        &limited.addr.to_string(),
        &keys,
        "with the Redis limit + metering",
    )
    .await;
    limited.stop().await;
    unlimited.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_gateway_revocation_latency() {
    let env = TestEnv::new("gw-bench-revoke").await;
    let _operator = env.start_operator().await;
    let (key, _) = issue(
        &env,
        "erin",
        "erin-key",
        &["*"],
        json!({"requestsPerSecond": 1_000_000}),
    )
    .await;
    let config = env.gateway_config();
    let (a, b) = (
        env.start_gateway(&config).await,
        env.start_gateway(&config).await,
    );
    let nginx = Nginx::start(&[a.addr.port(), b.addr.port()], start_upstream().await).await;
    let api = env.apikeys();
    let patch = |blocked: bool| {
        let api = api.clone();
        async move {
            api.patch(
                "erin-key",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"blocked": blocked}})),
            )
            .await
            .expect("patch blocked");
        }
    };
    let mut samples = Vec::new();
    for _ in 0..100 {
        eventually(
            "the key to be accepted",
            Duration::from_secs(30),
            || async { (through(&nginx, &key, "/v1/x").await.status == 200).then_some(()) },
        )
        .await;
        let started = Instant::now();
        patch(true).await;
        loop {
            if through(&nginx, &key, "/v1/x").await.status == 401 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no 401 within 30s"
            );
        }
        samples.push(started.elapsed());
        patch(false).await;
    }
    samples.sort();
    println!(
        "--- revocation latency (PATCH blocked: true -> first 401 through nginx, 2 replicas, at rest, {} tries): p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms",
        samples.len(),
        samples[samples.len() / 2].as_secs_f64() * 1000.0,
        samples[samples.len() * 99 / 100].as_secs_f64() * 1000.0,
        samples[samples.len() - 1].as_secs_f64() * 1000.0,
    );
    a.stop().await;
    b.stop().await;
}

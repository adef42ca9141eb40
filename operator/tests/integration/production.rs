//! Running it in production: leader election between replicas, metrics, and a flood
//! of changes collapsing into few reconciles.

use std::collections::HashMap;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::support::proxy::{CuttableProxy, host_port, via};
use crate::support::{Backends, Operator, TestEnv, eventually};

/// Parses the Prometheus text format into `name{labels}` -> value.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

pub async fn metric(op: &Operator, series: &str) -> f64 {
    parse_metrics(&op.metrics().await)
        .get(series)
        .copied()
        .unwrap_or(0.0)
}

/// Waits until `op` reports it leads.
pub async fn wait_leader(op: &Operator, what: &str, timeout: Duration) {
    eventually(what, timeout, || async {
        (metric(op, "m3o_operator_leader").await == 1.0).then_some(())
    })
    .await;
}

/// Short lease timings (also the writer fence's, with or without election).
pub const FAST_TIMINGS: [&str; 6] = [
    "--leader-election-lease-duration",
    "4s",
    "--leader-election-renew-deadline",
    "3s",
    "--leader-election-retry-period",
    "500ms",
];

pub fn elected(env: &TestEnv) -> Backends {
    let args = [
        "--leader-election",
        "--leader-election-namespace",
        env.ns.as_str(),
        "--leader-election-name",
        "m3o-operator-test",
    ];
    Backends {
        extra_args: args
            .iter()
            .chain(&FAST_TIMINGS)
            .map(|s| s.to_string())
            .collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_reconciles_and_a_standby_takes_over() {
    const N: usize = 100;
    let env = TestEnv::new("leader").await;
    let first = env.start_operator_with(elected(&env)).await;
    wait_leader(&first, "the first replica to lead", Duration::from_secs(20)).await;
    let second = env.start_operator_with(elected(&env)).await;
    let body = crate::support::http_get(&format!("127.0.0.1:{}", second.port), "/readyz")
        .await
        .expect("readyz");
    assert_eq!(
        body,
        (200, "ready (standby)".to_owned()),
        "a standby is ready, and says it is a standby"
    );

    env.apply_customer_batch("ha", N).await;
    eventually(
        "part of the batch provisioned by the leader",
        Duration::from_secs(60),
        || async { (env.outbox_count().await >= 10).then_some(()) },
    )
    .await;
    assert_eq!(metric(&second, "m3o_operator_leader").await, 0.0);
    assert_eq!(
        metric(&second, "m3o_operator_reconciles_total{kind=\"Customer\"}").await,
        0.0,
        "the standby does not reconcile"
    );
    first.kill().await;

    wait_leader(&second, "the standby to take over", Duration::from_secs(30)).await;
    env.wait_customers_ready(N, Duration::from_secs(120)).await;
    env.assert_each_customer_created_once(N).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_exist_and_move() {
    let env = TestEnv::new("metrics").await;
    let db_proxy = CuttableProxy::start(host_port(&env.database_url)).await;
    let backends = Backends {
        database_url: Some(via(&env.database_url, &db_proxy)),
        ..Default::default()
    };
    let op = env.start_operator_with(backends).await;
    let readyz = crate::support::http_get(&format!("127.0.0.1:{}", op.port), "/readyz").await;
    assert_eq!(
        readyz,
        Some((200, "ready (leader)".to_owned())),
        "ready once every kind is watched"
    );
    let before = parse_metrics(&op.metrics().await);
    let text = op.metrics().await;
    for family in [
        "m3o_operator_reconciles",
        "m3o_operator_reconcile_errors",
        "m3o_operator_reconcile_duration_seconds",
        "m3o_operator_resources",
        "m3o_operator_drift_corrections",
        "m3o_operator_outbox_backlog",
        "m3o_operator_outbox_oldest_unpublished_age_seconds",
        "m3o_operator_events_published",
        "m3o_operator_leader",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "family {family} is exposed:\n{text}"
        );
    }
    assert_eq!(before.get("m3o_operator_leader"), Some(&1.0));

    env.apply_customer("counted", json!({"email": "counted@example.com"}))
        .await;
    let c = env.wait_ready("counted").await;
    let id = c.status.and_then(|s| s.customer_id).expect("id");
    env.wait_events(1).await;
    let get = |m: &HashMap<String, f64>, s: &str| m.get(s).copied().unwrap_or(0.0);
    // A reconcile is counted when it starts and timed when it returns, which
    // can be after its status write and the relay's publish: wait for both.
    let after = eventually(
        "events_published and the reconcile's duration to move",
        Duration::from_secs(10),
        || async {
            let m = parse_metrics(&op.metrics().await);
            (get(&m, "m3o_operator_events_published_total") >= 1.0
                && get(
                    &m,
                    "m3o_operator_reconcile_duration_seconds_count{kind=\"Customer\"}",
                ) >= 1.0)
                .then_some(m)
        },
    )
    .await;
    assert!(
        get(&after, "m3o_operator_reconciles_total{kind=\"Customer\"}")
            > get(&before, "m3o_operator_reconciles_total{kind=\"Customer\"}")
    );
    assert!(
        get(
            &after,
            "m3o_operator_reconcile_duration_seconds_count{kind=\"Customer\"}"
        ) >= 1.0
    );
    assert_eq!(
        get(
            &after,
            "m3o_operator_resources{kind=\"Customer\",ready=\"true\"}"
        ),
        1.0
    );
    // The outbox figures are read at most every 5 s (operator/src/http.rs).
    let drained = eventually(
        "an outbox backlog of 0",
        Duration::from_secs(30),
        || async {
            let m = parse_metrics(&op.metrics().await);
            (m.get("m3o_operator_outbox_backlog").copied() == Some(0.0)).then_some(m)
        },
    )
    .await;
    assert_eq!(get(&drained, "m3o_operator_outbox_backlog"), 0.0);

    op.settle().await; // a trailing reconcile would restore the key before the watcher
    env.etcd
        .kv_client()
        .delete(
            format!(
                "{}/{}",
                env.etcd_prefix,
                m3o_platform_contract::customer_key(&id)
            ),
            None,
        )
        .await
        .expect("hand delete");
    eventually(
        "drift_corrections to move",
        Duration::from_secs(20),
        || async {
            (metric(
                &op,
                "m3o_operator_drift_corrections_total{kind=\"customers\"}",
            )
            .await
                >= 1.0)
                .then_some(())
        },
    )
    .await;

    db_proxy.cut();
    env.apply_customer(
        "counted",
        json!({"email": "counted@example.com", "name": "C"}),
    )
    .await;
    eventually("reconcile_errors to move", Duration::from_secs(30), || async {
        (metric(&op, "m3o_operator_reconcile_errors_total{kind=\"Customer\",reason=\"database_unavailable\"}").await >= 1.0).then_some(())
    })
    .await;
    db_proxy.restore();
    env.wait_ready("counted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_changes_collapses_into_few_reconciles() {
    let env = TestEnv::new("flood").await;
    let op = env.start_operator().await;
    env.apply_customer("busy", json!({"email": "busy@example.com"}))
        .await;
    env.wait_ready("busy").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = metric(&op, "m3o_operator_reconciles_total{kind=\"Customer\"}").await;
    for i in 0..50 {
        let patch = json!({"metadata": {"annotations": {"flood": i.to_string()}}});
        env.customers()
            .patch("busy", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("patch");
    }
    env.apply_customer(
        "busy",
        json!({"email": "busy@example.com", "name": "Final"}),
    )
    .await;
    let c = env.wait_ready("busy").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reconciles = metric(&op, "m3o_operator_reconciles_total{kind=\"Customer\"}").await - before;
    eprintln!("51 changes to one object -> {reconciles} reconciles");
    assert!(
        (1.0..=25.0).contains(&reconciles),
        "51 changes took {reconciles} reconciles"
    );
    let id = c.status.and_then(|s| s.customer_id).expect("id");
    assert_eq!(
        env.etcd_json(&m3o_platform_contract::customer_key(&id))
            .await
            .map(|v| v["name"].clone()),
        Some(json!("Final"))
    );
}

/// The timestamp of the first JSON log line of `log` containing `message`.
fn logged_at(log: &str, message: &str) -> Option<String> {
    log.lines().filter(|l| l.contains(message)).find_map(|l| {
        serde_json::from_str::<serde_json::Value>(l).ok()?["timestamp"]
            .as_str()
            .map(str::to_owned)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_stops_before_a_standby_starts() {
    let env = TestEnv::new("leader-cut").await;
    // The first replica reaches the API server through a proxy the test can cut.
    let kubeconfig =
        std::fs::read_to_string(crate::support::required_env("KUBECONFIG")).expect("kubeconfig");
    let server = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .expect("server")
        .to_owned();
    let api_proxy = CuttableProxy::start(host_port(&server)).await;
    let path =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}.kubeconfig", env.ns));
    std::fs::write(
        &path,
        kubeconfig.replace(&server, &via(&server, &api_proxy)),
    )
    .expect("write kubeconfig");
    let mut cut_off = elected(&env);
    cut_off
        .extra_args
        .extend(["--kubeconfig".to_owned(), path.display().to_string()]);

    let first = env.start_operator_with(cut_off).await;
    wait_leader(&first, "the first replica to lead", Duration::from_secs(20)).await;
    let second = env.start_operator_with(elected(&env)).await;
    api_proxy.cut();

    let first_log = first.log_path.clone();
    let exited = tokio::time::timeout(Duration::from_secs(20), first.wait())
        .await
        .expect("the cut-off leader exits");
    assert!(
        !exited.success(),
        "losing the lease is an error exit, so the pod restarts as a standby"
    );
    wait_leader(&second, "the standby to take over", Duration::from_secs(20)).await;
    let first_log = std::fs::read_to_string(first_log).expect("log");
    assert!(first_log.contains("lost the leader lease"), "{first_log}");
    let stopped =
        logged_at(&first_log, "m3o-operator stopped").expect("the old leader logged its stop");
    let second_log = std::fs::read_to_string(&second.log_path).expect("log");
    let took_over =
        logged_at(&second_log, "became the leader").expect("the standby logged its election");
    // RFC 3339 UTC timestamps of equal precision compare as strings.
    assert!(
        stopped < took_over,
        "the old leader stopped ({stopped}) before the new one started ({took_over})"
    );

    env.apply_customer("after", json!({"email": "after@example.com"}))
        .await;
    env.wait_ready("after").await;
}

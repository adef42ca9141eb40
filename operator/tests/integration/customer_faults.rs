//! Customers through backend outages and operator crashes.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::proxy::{CuttableProxy, host_port, via};
use crate::support::{Backends, PrivateRedis, TestEnv, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_in_the_outbox_while_redis_is_down() {
    let env = TestEnv::new("cust-redis").await;
    let mut redis = PrivateRedis::start().await;
    let _op = env
        .start_operator_with(Backends {
            redis_url: Some(redis.url()),
            ..Default::default()
        })
        .await;
    redis.pause().await;

    let names: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    for name in &names {
        env.apply_customer(name, json!({"email": format!("{name}@example.com")}))
            .await;
        env.wait_ready(name).await; // in order, so the outbox order is known
    }
    let unpublished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&env.db)
            .await
            .expect("count");
    assert_eq!(
        unpublished, 5,
        "Ready without Redis; the events wait in the outbox"
    );

    redis.resume().await;
    let url = redis.url();
    let events = eventually(
        "5 events after Redis returns",
        Duration::from_secs(30),
        || async {
            let events = env.stream_events_at(&url).await;
            (events.len() >= 5).then_some(events)
        },
    )
    .await;
    assert_eq!(events.len(), 5, "none duplicated");
    let emails: Vec<String> = events
        .iter()
        .map(|e| {
            e.event
                .customer
                .as_ref()
                .map(|c| c.email.clone())
                .unwrap_or_default()
        })
        .collect();
    let expected: Vec<String> = names.iter().map(|n| format!("{n}@example.com")).collect();
    assert_eq!(emails, expected, "published in commit order");
    assert_eq!(
        events.iter().map(|e| e.id).collect::<HashSet<_>>().len(),
        5,
        "distinct ids"
    );
    let outbox_ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM outbox ORDER BY seq")
        .fetch_all(&env.db)
        .await
        .expect("ids");
    assert_eq!(
        events.iter().map(|e| e.id).collect::<Vec<_>>(),
        outbox_ids,
        "stream ids are the outbox ids"
    );
    eventually("rows marked published", Duration::from_secs(10), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&env.db)
            .await
            .ok()?;
        (n == 0).then_some(())
    })
    .await;
}

/// Reads the Ready reason of a customer, if any.
async fn ready_reason(env: &TestEnv, name: &str) -> Option<String> {
    let c = env.customers().get_opt(name).await.ok()??;
    c.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_show_in_status_and_heal() {
    let env = TestEnv::new("cust-outage").await;
    let db_proxy = CuttableProxy::start(host_port(&env.database_url)).await;
    let etcd_proxy = CuttableProxy::start(host_port(&env.etcd_endpoints)).await;
    let backends = Backends {
        database_url: Some(via(&env.database_url, &db_proxy)),
        etcd_endpoints: Some(via(&env.etcd_endpoints, &etcd_proxy)),
        ..Default::default()
    };
    let _op = env.start_operator_with(backends).await;

    db_proxy.cut();
    env.apply_customer("patient", json!({"email": "patient@example.com"}))
        .await;
    eventually(
        "DatabaseUnavailable in status",
        Duration::from_secs(30),
        || async {
            (ready_reason(&env, "patient").await.as_deref() == Some("DatabaseUnavailable"))
                .then_some(())
        },
    )
    .await;
    db_proxy.restore();
    env.wait_ready("patient").await;

    etcd_proxy.cut();
    env.apply_customer(
        "patient",
        json!({"email": "patient@example.com", "name": "P"}),
    )
    .await;
    eventually(
        "ConfigStoreUnavailable in status",
        Duration::from_secs(60),
        || async {
            (ready_reason(&env, "patient").await.as_deref() == Some("ConfigStoreUnavailable"))
                .then_some(())
        },
    )
    .await;
    etcd_proxy.restore();
    let c = env.wait_ready("patient").await;
    let id = c.status.and_then(|s| s.customer_id).expect("id");
    assert_eq!(
        env.etcd_json(&m3o_platform_contract::customer_key(&id))
            .await
            .and_then(|v| v["name"].as_str().map(str::to_owned)),
        Some("P".into())
    );
    assert_eq!(
        env.wait_events(2).await.len(),
        2,
        "Created and Updated, each once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_loses_and_duplicates_nothing() {
    const N: usize = 200;
    let env = TestEnv::new("cust-crash").await;
    env.apply_customer_batch("batch", N).await;

    // The whole batch is queued; kill the operator as soon as part of it is written.
    let started = Instant::now();
    let op = env.start_operator().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.outbox_count().await < 10 {
        assert!(Instant::now() < deadline, "operator made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    op.kill().await;
    let at_kill = env.outbox_count().await;
    assert!(
        at_kill < N as i64,
        "killed mid-batch ({at_kill} of {N} written)"
    );

    let _op = env.start_operator().await;
    env.wait_customers_ready(N, Duration::from_secs(180)).await;
    eprintln!(
        "{N} customers Ready in {:?} (killed after {at_kill} rows)",
        started.elapsed()
    );

    env.assert_each_customer_created_once(N).await;
}

//! Customers through backend outages and operator crashes.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use crate::support::proxy::{CuttableProxy, host_port, via};
use crate::support::{Backends, PrivateRedis, TestEnv, dedupe, eventually};

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
        env.etcd_json(&format!("customers/{id}"))
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
    let names: Vec<String> = (0..N).map(|i| format!("batch-{i:03}")).collect();
    futures::stream::iter(names.iter())
        .for_each_concurrent(16, |name| {
            let env = &env;
            async move {
                env.apply_customer(name, json!({"email": format!("{name}@example.com")}))
                    .await;
            }
        })
        .await;

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
    eventually("all customers Ready", Duration::from_secs(180), || async {
        let list = env.customers().list(&Default::default()).await.ok()?;
        let ready = list.items.iter().filter(|c| {
            c.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        });
        (ready.count() == N).then_some(())
    })
    .await;
    eprintln!(
        "{N} customers Ready in {:?} (killed after {at_kill} rows)",
        started.elapsed()
    );

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM customers WHERE deleted_at IS NULL")
        .fetch_one(&env.db)
        .await
        .expect("rows");
    assert_eq!(rows, N as i64);
    let created: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE event_type = 'EventTypeCreated'")
            .fetch_one(&env.db)
            .await
            .expect("outbox");
    assert_eq!(created, N as i64, "one Created event per customer");
    let events = eventually("all events published", Duration::from_secs(60), || async {
        let events = dedupe(env.stream_events().await);
        (events.len() >= N).then_some(events)
    })
    .await;
    assert_eq!(events.len(), N, "{N} distinct event ids");
    let mut per_customer: HashMap<String, usize> = HashMap::new();
    for e in &events {
        assert_eq!(e.event_type, "EventTypeCreated");
        *per_customer
            .entry(
                e.event
                    .customer
                    .as_ref()
                    .map(|c| c.id.clone())
                    .unwrap_or_default(),
            )
            .or_default() += 1;
    }
    assert_eq!(per_customer.len(), N);
    assert!(
        per_customer.values().all(|n| *n == 1),
        "no customer announced twice"
    );
    assert_eq!(env.etcd_keys().await.len(), N, "{N} etcd keys");
}

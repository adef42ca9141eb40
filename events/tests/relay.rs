//! Outbox relay against real Postgres and Redis (see `support` for the environment).

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use m3o_events::consumer::{Consumer, ConsumerConfig};
use m3o_events::customers::{self, EventType};
use m3o_events::outbox::{self, OutboxMessage};
use m3o_events::stream_key;
use support::{
    RedisServer, RunningRelay, TestDb, customer_event, env_url, init_tracing, poll_until,
    read_stream, relay, stream_prefix, test_config, wait_for_entries,
};
use uuid::Uuid;

/// Long enough that only NOTIFY (or the start-up drain) can explain a quick publish.
const SLOW_FALLBACK: Duration = Duration::from_secs(30);

#[tokio::test]
async fn committed_events_are_published_in_seq_order_and_decode() {
    init_tracing();
    let redis_url = env_url("REDIS_URL");
    let db = TestDb::new().await;
    let prefix = stream_prefix();
    let key = stream_key(&prefix, customers::TOPIC);

    // Some events exist before the relay starts (start-up drain), more arrive later, two
    // of them in one transaction.
    let before = [
        customer_event("c1", EventType::Created, 1),
        customer_event("c1", EventType::Verified, 2),
    ];
    let mut ids = db.enqueue_committed(&before).await;
    let relay = RunningRelay::start(&db, &redis_url, &prefix, SLOW_FALLBACK);
    let same_tx = [
        customer_event("c2", EventType::Created, 3),
        customer_event("c1", EventType::SubscriptionChanged, 4),
    ];
    let mut tx = db.pool.begin().await.expect("begin");
    for (aggregate, event) in &same_tx {
        let msg = OutboxMessage::from_event(aggregate.clone(), event);
        ids.push(outbox::enqueue(&mut tx, &msg).await.expect("enqueue"));
    }
    tx.commit().await.expect("commit");
    let after = [customer_event("c2", EventType::Banned, 5)];
    ids.extend(db.enqueue_committed(&after).await);
    let sent: Vec<_> = before.iter().chain(&same_tx).chain(&after).collect();

    let entries = wait_for_entries(&redis_url, &key, sent.len(), Duration::from_secs(10)).await;
    assert_eq!(entries.len(), sent.len(), "no extra entries");
    for ((entry, id), (_, event)) in entries.iter().zip(&ids).zip(&sent) {
        assert_eq!(&entry.id, id, "entries in seq order");
        assert_eq!(&entry.event, event, "payload decodes to what was enqueued");
        assert_eq!(entry.event_type, event.r#type().as_str_name());
        let created = DateTime::parse_from_rfc3339(&entry.created).expect("created is RFC 3339");
        assert!(created.with_timezone(&Utc) <= Utc::now());
    }

    // The relay commits `published_at` just after XADD returns.
    wait_for_empty_backlog(&db).await;
    let rows = published_rows(&db, &["c1", "c2"]).await;
    assert_eq!(rows.len(), sent.len());
    for row in &rows {
        assert!(
            row.published_at.is_some(),
            "row {} marked published",
            row.seq
        );
        assert_eq!(row.attempts, 1);
    }
    assert_eq!(relay.stats.published_total(), 5);
    relay.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn rolled_back_event_is_never_published() {
    init_tracing();
    let redis_url = env_url("REDIS_URL");
    let db = TestDb::new().await;
    let prefix = stream_prefix();
    let key = stream_key(&prefix, customers::TOPIC);
    let relay = RunningRelay::start(&db, &redis_url, &prefix, Duration::from_millis(200));

    let (aggregate, event) = customer_event("ghost", EventType::Created, 1);
    let mut tx = db.pool.begin().await.expect("begin");
    let ghost = outbox::enqueue(&mut tx, &OutboxMessage::from_event(aggregate, &event))
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");
    let marker = db
        .enqueue_committed(&[customer_event("real", EventType::Created, 2)])
        .await;

    let entries = wait_for_entries(&redis_url, &key, 1, Duration::from_secs(10)).await;
    // Give the relay several fallback rounds to (wrongly) publish anything else.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let entries_later = read_stream(&redis_url, &key).await;
    assert_eq!(entries, entries_later);
    let ids: Vec<Uuid> = entries.iter().map(|e| e.id).collect();
    assert_eq!(ids, marker);
    assert!(!ids.contains(&ghost));
    assert!(published_rows(&db, &["ghost"]).await.is_empty());
    relay.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn redis_outage_delays_but_never_loses_reorders_or_duplicates() {
    init_tracing();
    let db = TestDb::new().await;
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let prefix = stream_prefix();
    let key = stream_key(&prefix, customers::TOPIC);
    // One counted refusal would park a row: an outage must count none.
    let mut config = test_config(&db, &prefix, SLOW_FALLBACK);
    config.max_attempts = 1;
    let relay = RunningRelay::start_with(&db, &url, config);

    // Up and publishing.
    db.enqueue_committed(&[customer_event("warmup", EventType::Created, 0)])
        .await;
    wait_for_entries(&url, &key, 1, Duration::from_secs(10)).await;

    // Down: events pile up, unpublished, in order; nothing is blamed on the rows.
    redis.kill().await;
    const N: i64 = 20;
    let events: Vec<_> = (1..=N)
        .map(|n| customer_event(&format!("o{n}"), EventType::Updated, n))
        .collect();
    let ids = db.enqueue_committed(&events).await;
    // Several retries that include the rows (they were enqueued before the first).
    let before = relay.stats.failures_total();
    let failing = poll_until(Duration::from_secs(10), || async {
        (relay.stats.is_failing() && relay.stats.failures_total() >= before + 3).then_some(())
    })
    .await;
    assert!(failing.is_some(), "relay reports the outage and retries");
    let backlog = outbox::backlog(&db.pool).await.expect("backlog");
    assert_eq!(backlog.count, N, "all events wait in the outbox");
    assert!(backlog.oldest.is_some());
    let aggregates: Vec<String> = events.iter().map(|(a, _)| a.clone()).collect();
    let aggregates: Vec<&str> = aggregates.iter().map(String::as_str).collect();
    let rows = published_rows(&db, &aggregates).await;
    for row in &rows {
        assert_eq!(row.attempts, 0, "an outage is not the row's attempt");
        assert_eq!(row.parked_at, None, "an outage parks nothing");
    }
    assert_eq!(backlog.parked, 0);
    assert!(relay.stats.last_error().is_some());

    // Back (empty, no persistence): everything arrives, in order, once.
    redis.restart().await;
    let entries = wait_for_entries(&url, &key, ids.len(), Duration::from_secs(20)).await;
    let got: Vec<Uuid> = entries.iter().map(|e| e.id).collect();
    assert_eq!(got, ids, "all events, in seq order");
    let unique: HashSet<Uuid> = got.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "no duplicates");
    wait_for_empty_backlog(&db).await;
    for row in published_rows(&db, &aggregates).await {
        assert!(row.published_at.is_some(), "row {} published", row.seq);
    }
    let recovered = poll_until(Duration::from_secs(5), || async {
        (!relay.stats.is_failing()).then_some(())
    })
    .await;
    assert!(recovered.is_some(), "relay reports recovery");
    relay.stop().await;
    redis.kill().await;
    db.cleanup().await;
}

#[tokio::test]
async fn notify_wakes_the_relay_long_before_the_fallback_timer() {
    init_tracing();
    let redis_url = env_url("REDIS_URL");
    let db = TestDb::new().await;
    let prefix = stream_prefix();
    let key = stream_key(&prefix, customers::TOPIC);
    let relay = RunningRelay::start(&db, &redis_url, &prefix, SLOW_FALLBACK);
    // The first event may be caught by the catch-up drain after LISTEN; later ones only
    // by NOTIFY, since the timer would take 30 s.
    db.enqueue_committed(&[customer_event("w", EventType::Created, 0)])
        .await;
    wait_for_entries(&redis_url, &key, 1, Duration::from_secs(10)).await;
    for n in 1..=3 {
        let started = Instant::now();
        db.enqueue_committed(&[customer_event("w", EventType::Updated, n)])
            .await;
        let expected = usize::try_from(n + 1).expect("small");
        wait_for_entries(&redis_url, &key, expected, Duration::from_secs(5)).await;
        let latency = started.elapsed();
        assert!(latency < Duration::from_secs(2), "publish took {latency:?}");
    }
    relay.stop().await;
    db.cleanup().await;
}

/// Two relays on one schema (a leader hand-over) publish in `seq` order, and a relay
/// that finds the other in the middle of a batch leaves the drain to it at once rather
/// than waiting on its row locks (the schema's advisory lock). A relay that waited
/// would sit out the holder's whole `XADD` (here: a frozen Redis) and then publish on.
#[tokio::test]
async fn two_relays_on_one_schema_keep_seq_order() {
    init_tracing();
    let db = TestDb::new().await;
    let redis = RedisServer::start().await;
    let url = redis.url();
    let prefix = stream_prefix();
    let key = stream_key(&prefix, customers::TOPIC);
    let events: Vec<_> = (0..60)
        .map(|n| customer_event(&format!("t{n}"), EventType::Created, n))
        .collect();
    let ids = db.enqueue_committed(&events).await;

    // Relay A is in the middle of a batch: rows selected, XADD sent, Redis frozen.
    let holder = format!("relay-a-{}", &db.schema[7..19]);
    let pool_a = db.pool_named(&holder).await;
    let mut a = relay(&pool_a, &url, test_config(&db, &prefix, SLOW_FALLBACK));
    let mut b = relay(&db.pool, &url, test_config(&db, &prefix, SLOW_FALLBACK));
    redis.pause().await;
    let a_batch = tokio::spawn(async move { (a.publish_batch().await, a) });
    let in_batch = poll_until(Duration::from_secs(10), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND state = 'idle in transaction'",
        )
        .bind(&holder)
        .fetch_one(&db.pool)
        .await
        .expect("pg_stat_activity");
        (waiting == 1).then_some(())
    })
    .await;
    assert!(in_batch.is_some(), "relay A holds a batch open");
    let started = Instant::now();
    let b_batch = tokio::time::timeout(Duration::from_secs(3), b.publish_batch()).await;
    let waited = started.elapsed();
    redis.resume().await;
    let b_outcome = b_batch
        .unwrap_or_else(|_| panic!("relay B waited {waited:?} on relay A's batch"))
        .expect("relay B");
    assert_eq!(b_outcome.published, 0, "relay B leaves the batch to A");
    assert!(waited < Duration::from_secs(1), "relay B waited {waited:?}");
    let (a_outcome, a) = a_batch.await.expect("relay A task");
    assert_eq!(a_outcome.expect("relay A").published, 7);
    drop(a);
    pool_a.close().await;

    // Both running at once drain the rest, in order, once each.
    let a = RunningRelay::start(&db, &url, &prefix, Duration::from_millis(100));
    let b = RunningRelay::start(&db, &url, &prefix, Duration::from_millis(100));
    let entries = wait_for_entries(&url, &key, ids.len(), Duration::from_secs(15)).await;
    let got: Vec<Uuid> = entries.iter().map(|e| e.id).collect();
    assert_eq!(got, ids);
    a.stop().await;
    b.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn consumer_group_reads_decodes_and_acks() {
    init_tracing();
    let redis_url = env_url("REDIS_URL");
    let db = TestDb::new().await;
    let prefix = stream_prefix();
    let key = stream_key(&prefix, customers::TOPIC);
    let client = redis::Client::open(redis_url.as_str()).expect("redis url");
    let mut config = ConsumerConfig::new(key.clone(), "billing", "billing-0");
    config.block = Duration::from_millis(200);
    let mut consumer = Consumer::connect(&client, config.clone())
        .await
        .expect("consumer connects and creates the group");
    // A second connect finds the group (BUSYGROUP is not an error).
    Consumer::connect(&client, config)
        .await
        .expect("group exists");

    let relay = RunningRelay::start(&db, &redis_url, &prefix, SLOW_FALLBACK);
    let ids = db
        .enqueue_committed(&[
            customer_event("k1", EventType::GenerateKey, 1),
            customer_event("k1", EventType::BlockKey, 2),
        ])
        .await;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < ids.len() && Instant::now() < deadline {
        for entry in consumer.read().await.expect("XREADGROUP") {
            got.push(entry.expect("entry decodes"));
        }
    }
    assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    assert_eq!(got[1].event_type, "EventTypeBlockKey");
    let stream_ids: Vec<String> = got.iter().map(|e| e.stream_id.clone()).collect();
    assert_eq!(consumer.ack(&stream_ids).await.expect("XACK"), 2);
    assert!(consumer.read().await.expect("XREADGROUP").is_empty());
    relay.stop().await;
    db.cleanup().await;
}

/// Outbox rows of the given aggregates, in seq order.
async fn published_rows(db: &TestDb, aggregates: &[&str]) -> Vec<outbox::OutboxRow> {
    let mut rows = Vec::new();
    for aggregate in aggregates {
        rows.extend(
            outbox::rows_for(&db.pool, aggregate)
                .await
                .expect("outbox rows"),
        );
    }
    rows.sort_by_key(|r| r.seq);
    rows
}

#[tokio::test]
async fn listener_reconnects_after_its_connection_is_killed() {
    init_tracing();
    let redis_url = env_url("REDIS_URL");
    let db = TestDb::new().await;
    let prefix = stream_prefix();
    let key = stream_key(&prefix, customers::TOPIC);
    let relay = RunningRelay::start(&db, &redis_url, &prefix, SLOW_FALLBACK);
    db.enqueue_committed(&[customer_event("r", EventType::Created, 0)])
        .await;
    wait_for_entries(&redis_url, &key, 1, Duration::from_secs(10)).await;

    let name = format!("m3o-outbox-listener:{}", db.schema);
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&name)
    .fetch_all(&db.pool)
    .await
    .expect("terminate the listener");
    assert_eq!(killed, [true], "exactly one listener connection ({name})");

    // Without a working LISTEN only the 30 s timer would publish this.
    db.enqueue_committed(&[customer_event("r", EventType::Updated, 1)])
        .await;
    wait_for_entries(&redis_url, &key, 2, Duration::from_secs(5)).await;
    relay.stop().await;
    db.cleanup().await;
}

/// Waits until every outbox row is marked published.
async fn wait_for_empty_backlog(db: &TestDb) {
    let drained = poll_until(Duration::from_secs(5), || async {
        let backlog = outbox::backlog(&db.pool).await.expect("backlog");
        (backlog.count == 0 && backlog.oldest.is_none()).then_some(())
    })
    .await;
    assert!(drained.is_some(), "outbox backlog drains");
}

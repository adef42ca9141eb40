//! Failure isolation of the relay against real Postgres and Redis: poison rows are
//! parked while the rest flows, batches are bounded by bytes, published rows expire,
//! an outage ends quickly, consumer-group lag is measured.

mod support;

use std::time::{Duration, Instant};

use m3o_events::customers::{self, EventType};
use m3o_events::outbox::admin::{self, Redrive, StuckState};
use m3o_events::outbox::{self, OutboxMessage};
use m3o_events::stream_key;
use support::{
    RedisServer, RunningRelay, TestDb, customer_event, env_url, init_tracing, poll_until, relay,
    stream_prefix, test_config, wait_for_entries,
};
use uuid::Uuid;

/// A topic other than `customers`, to show that other streams keep flowing.
const OTHER_TOPIC: &str = "isolation-other";

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connects")
}

async fn enqueue_other(db: &TestDb, n: i64) -> Uuid {
    let (aggregate, event) = customer_event(&format!("other{n}"), EventType::Updated, n);
    let mut msg = OutboxMessage::from_event(aggregate, &event);
    msg.topic = OTHER_TOPIC;
    let mut tx = db.pool.begin().await.expect("begin");
    let id = outbox::enqueue(&mut tx, &msg).await.expect("enqueue");
    tx.commit().await.expect("commit");
    id
}

async fn row(db: &TestDb, id: Uuid) -> outbox::OutboxRow {
    sqlx::query_as(
        "SELECT id, seq, topic, event_type, aggregate_id, payload, created_at, published_at, \
         attempts, parked_at, last_error FROM outbox WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .expect("outbox row")
}

/// `events:customers` holding a string (every XADD to it fails with WRONGTYPE): its
/// rows are parked after `max_attempts`, the same customer's later row waits behind
/// its parked one, other streams keep flowing; once the key is fixed and the rows
/// re-driven, they arrive in order.
#[tokio::test]
async fn wrongtype_stream_parks_its_rows_while_other_topics_flow() {
    init_tracing();
    let url = env_url("REDIS_URL");
    let db = TestDb::new().await;
    let prefix = stream_prefix();
    let key = stream_key(&prefix, customers::TOPIC);
    let other = stream_key(&prefix, OTHER_TOPIC);
    let mut conn = redis_conn(&url).await;
    redis::cmd("SET")
        .arg(&key)
        .arg("x")
        .query_async::<()>(&mut conn)
        .await
        .expect("SET");
    let mut config = test_config(&db, &prefix, Duration::from_secs(30));
    config.max_attempts = 3;
    config.backoff_min = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(100);
    let mut relay = RunningRelay::start_with(&db, &url, config);

    let a = db
        .enqueue_committed(&[
            customer_event("a", EventType::Created, 1),
            customer_event("a", EventType::Updated, 2),
        ])
        .await;
    let b = db
        .enqueue_committed(&[customer_event("b", EventType::Created, 3)])
        .await;
    let first_other = enqueue_other(&db, 4).await;

    // The other stream gets its event while the customers rows are retried.
    let entries = wait_for_entries(&url, &other, 1, Duration::from_secs(10)).await;
    assert_eq!(entries[0].id, first_other);
    let parked = poll_until(Duration::from_secs(10), || async {
        let backlog = outbox::backlog(&db.pool).await.expect("backlog");
        (backlog.parked == 2).then_some(backlog)
    })
    .await
    .expect("two rows parked");
    assert_eq!(parked.count, 1, "a's second event waits (held)");
    for id in [a[0], b[0]] {
        let row = row(&db, id).await;
        assert!(row.parked_at.is_some(), "{id} parked");
        assert_eq!(row.attempts, 3, "{id} refused max_attempts times");
        let error = row.last_error.unwrap_or_default();
        assert!(error.contains("WRONGTYPE"), "last_error: {error}");
    }
    let held = row(&db, a[1]).await;
    assert_eq!((held.attempts, held.parked_at), (0, None), "never sent");
    let mut reported = Vec::new();
    while let Ok(event) = relay.parked.try_recv() {
        reported.push((event.id, event.attempts, event.topic));
    }
    assert_eq!(
        reported,
        [(a[0], 3, "customers".into()), (b[0], 3, "customers".into())]
    );
    assert_eq!(relay.stats.parked_total(), 2);

    let stuck = admin::stuck_rows(&db.pool, Duration::from_secs(3600), 100)
        .await
        .expect("stuck rows");
    let states: Vec<(Uuid, StuckState)> = stuck.iter().map(|r| (r.id, r.state)).collect();
    assert_eq!(
        states,
        [
            (a[0], StuckState::Parked),
            (a[1], StuckState::Held),
            (b[0], StuckState::Parked)
        ]
    );

    // Later events on other topics still arrive, at once.
    let started = Instant::now();
    let later_other = enqueue_other(&db, 5).await;
    let entries = wait_for_entries(&url, &other, 2, Duration::from_secs(5)).await;
    assert_eq!(entries[1].id, later_other);
    assert!(started.elapsed() < Duration::from_secs(2));

    // Fixed and re-driven: the customers events arrive, in seq order.
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut conn)
        .await
        .expect("DEL");
    let mut tx = db.pool.begin().await.expect("begin");
    let redriven = admin::redrive(&mut tx, &Redrive::All)
        .await
        .expect("redrive");
    tx.commit().await.expect("commit");
    let redriven: Vec<Uuid> = redriven.iter().map(|r| r.id).collect();
    assert_eq!(redriven, [a[0], b[0]]);
    let entries = wait_for_entries(&url, &key, 3, Duration::from_secs(5)).await;
    let got: Vec<Uuid> = entries.iter().map(|e| e.id).collect();
    assert_eq!(got, [a[0], a[1], b[0]]);
    relay.stop().await;
    db.cleanup().await;
}

/// Batches are cut by payload bytes: with a 64 KiB bound, 30 KiB events go two at a
/// time and a 200 KiB event alone, all in order.
#[tokio::test]
async fn large_payloads_are_split_into_byte_bounded_batches() {
    init_tracing();
    let url = env_url("REDIS_URL");
    let db = TestDb::new().await;
    let prefix = stream_prefix();
    let key = stream_key(&prefix, customers::TOPIC);
    let big = |n: i64, bytes: usize| {
        let (aggregate, mut event) = customer_event(&format!("big{n}"), EventType::Updated, n);
        if let Some(c) = event.customer.as_mut() {
            c.meta.insert("blob".into(), "x".repeat(bytes));
        }
        (aggregate, event)
    };
    let mut events: Vec<_> = (0..5).map(|n| big(n, 30 * 1024)).collect();
    events.insert(3, big(9, 200 * 1024));
    let ids = db.enqueue_committed(&events).await;

    let mut config = test_config(&db, &prefix, Duration::from_secs(30));
    config.batch_size = 100;
    config.batch_max_bytes = 64 * 1024;
    let mut relay = relay(&db.pool, &url, config);
    let mut sizes = Vec::new();
    loop {
        let outcome = relay.publish_batch().await.expect("batch");
        if outcome.published == 0 {
            break;
        }
        sizes.push(outcome.published);
    }
    // Rows: 30, 30, 30, 200, 30, 30 KiB.
    assert_eq!(sizes, [2, 1, 1, 2]);
    let entries = wait_for_entries(&url, &key, ids.len(), Duration::from_secs(5)).await;
    let got: Vec<Uuid> = entries.iter().map(|e| e.id).collect();
    assert_eq!(got, ids);
    db.cleanup().await;
}

/// Retention deletes published rows older than the bound, in bounded batches, and
/// keeps recent published rows and every unpublished or parked row however old.
#[tokio::test]
async fn retention_deletes_old_published_rows_and_keeps_unpublished_ones() {
    init_tracing();
    let url = env_url("REDIS_URL");
    let db = TestDb::new().await;
    let prefix = stream_prefix();
    let events: Vec<_> = (0..5)
        .map(|n| customer_event(&format!("r{n}"), EventType::Created, n))
        .collect();
    let published = db.enqueue_committed(&events).await;
    let mut config = test_config(&db, &prefix, Duration::from_secs(30));
    config.retention = Duration::from_secs(3 * 24 * 3600);
    config.retention_batch = 2;
    let mut relay = relay(&db.pool, &url, config);
    assert_eq!(relay.drain().await.expect("drain"), 5);
    let unpublished = db
        .enqueue_committed(&[
            customer_event("u1", EventType::Created, 6),
            customer_event("u2", EventType::Created, 7),
        ])
        .await;
    let (old, recent) = published.split_at(3);
    sqlx::query("UPDATE outbox SET published_at = now() - interval '4 days' WHERE id = ANY($1)")
        .bind(old)
        .execute(&db.pool)
        .await
        .expect("age published rows");
    sqlx::query("UPDATE outbox SET created_at = now() - interval '9 days' WHERE id = ANY($1)")
        .bind(&unpublished)
        .execute(&db.pool)
        .await
        .expect("age unpublished rows");
    sqlx::query("UPDATE outbox SET parked_at = now() - interval '8 days' WHERE id = $1")
        .bind(unpublished[1])
        .execute(&db.pool)
        .await
        .expect("park one");

    assert_eq!(
        relay.delete_expired().await,
        3,
        "over two bounded statements"
    );
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .expect("rows");
    let kept: Vec<Uuid> = recent.iter().chain(&unpublished).copied().collect();
    assert_eq!(left, kept);
    assert_eq!(relay.delete_expired().await, 0);
    db.cleanup().await;
}

/// After Redis has been down long enough for the backoff to grow to seconds, the
/// backlog starts draining within about a second of Redis answering again (probes),
/// not at the end of the backoff.
#[tokio::test]
async fn backlog_drains_within_a_second_of_redis_answering() {
    init_tracing();
    let db = TestDb::new().await;
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let prefix = stream_prefix();
    let key = stream_key(&prefix, customers::TOPIC);
    let mut config = test_config(&db, &prefix, Duration::from_secs(30));
    config.backoff_min = Duration::from_millis(50);
    config.backoff_max = Duration::from_secs(60);
    let relay = RunningRelay::start_with(&db, &url, config);
    db.enqueue_committed(&[customer_event("warm", EventType::Created, 0)])
        .await;
    wait_for_entries(&url, &key, 1, Duration::from_secs(10)).await;

    redis.kill().await;
    let events: Vec<_> = (1..=50)
        .map(|n| customer_event(&format!("d{n}"), EventType::Updated, n))
        .collect();
    let ids = db.enqueue_committed(&events).await;
    // Eight failures: the relay now backs off for 50 ms * 2^7 = 6.4 s.
    let grown = poll_until(Duration::from_secs(20), || async {
        (relay.stats.failures_total() >= 8).then_some(())
    })
    .await;
    assert!(grown.is_some(), "the relay kept retrying");

    redis.restart().await;
    let answering = Instant::now();
    let entries = wait_for_entries(&url, &key, 1, Duration::from_secs(10)).await;
    let first = answering.elapsed();
    assert_eq!(entries[0].id, ids[0]);
    assert!(
        first < Duration::from_millis(1500),
        "first backlog entry {first:?} after Redis answered"
    );
    let entries = wait_for_entries(&url, &key, ids.len(), Duration::from_secs(10)).await;
    let got: Vec<Uuid> = entries.iter().map(|e| e.id).collect();
    assert_eq!(got, ids);
    eprintln!(
        "first backlog entry {first:?} after Redis answered; all {} after {:?}",
        ids.len(),
        answering.elapsed()
    );
    relay.stop().await;
    redis.kill().await;
    db.cleanup().await;
}

/// The lag of each consumer group of a topic's stream: a group that has not read
/// lags by every entry; one that read everything lags by none, with its entries pending
/// until acknowledged.
#[tokio::test]
async fn consumer_group_lag_is_measured_per_stream_and_group() {
    init_tracing();
    let url = env_url("REDIS_URL");
    let db = TestDb::new().await;
    let prefix = stream_prefix();
    let key = stream_key(&prefix, customers::TOPIC);
    let mut conn = redis_conn(&url).await;
    for group in ["idle", "busy"] {
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<()>(&mut conn)
            .await
            .expect("XGROUP CREATE");
    }
    let mut config = test_config(&db, &prefix, Duration::from_secs(30));
    config.lag_interval = Duration::from_millis(100);
    let relay = RunningRelay::start_with(&db, &url, config);
    let events: Vec<_> = (0..3)
        .map(|n| customer_event(&format!("l{n}"), EventType::Created, n))
        .collect();
    db.enqueue_committed(&events).await;
    wait_for_entries(&url, &key, 3, Duration::from_secs(10)).await;
    redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("busy")
        .arg("c1")
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .query_async::<redis::Value>(&mut conn)
        .await
        .expect("XREADGROUP");

    let lags = poll_until(Duration::from_secs(5), || async {
        let lags = relay.stats.group_lags();
        let figures: Vec<(String, Option<u64>, u64)> = lags
            .iter()
            .filter(|l| l.stream == key)
            .map(|l| (l.group.clone(), l.lag, l.pending))
            .collect();
        (figures == [("busy".into(), Some(0), 3), ("idle".into(), Some(3), 0)]).then_some(())
    })
    .await;
    assert!(lags.is_some(), "lags seen: {:?}", relay.stats.group_lags());
    relay.stop().await;
    db.cleanup().await;
}

//! The writer fence: one writing process per schema with or without leader election;
//! a hung writer (SIGSTOP: its TCP connections stay open) is replaced within the lease
//! and writes nothing once it wakes up; a long-running task that ends stops the process.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::production::{FAST_TIMINGS, elected, metric, wait_leader};
use crate::support::{Backends, Operator, TestEnv, eventually, exit_log, http_get};

/// The lease of the fast timings below, and what the brief allows on top of it.
const LEASE: Duration = Duration::from_secs(4);
const TAKEOVER_SLACK: Duration = Duration::from_secs(5);

/// The current writer term: epoch and the holder's application_name.
async fn term(env: &TestEnv) -> (i64, String) {
    sqlx::query_as("SELECT epoch, holder_app FROM writer_fence")
        .fetch_one(&env.db)
        .await
        .expect("read writer_fence")
}

/// Customer rows and outbox rows last written in term `epoch`.
async fn written_in(env: &TestEnv, epoch: i64) -> (i64, i64) {
    let count = |table: &str| {
        let sql = format!("SELECT count(*) FROM {table} WHERE writer_epoch = $1");
        let db = env.db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&sql)
                .bind(epoch)
                .fetch_one(&db)
                .await
                .expect("count rows of a term")
        }
    };
    (count("customers").await, count("outbox").await)
}

async fn wait_stopped(op: &Operator) {
    eventually(
        "the process to be stopped",
        Duration::from_secs(30),
        || async { op.is_stopped().then_some(()) },
    )
    .await;
}

/// Waits for a process that was continued (or failed) to exit, and returns its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_leader_is_replaced_and_writes_nothing_when_it_wakes() {
    let env = TestEnv::new("hung-leader").await;
    // The failpoint SIGSTOPs the leader at the worst moment: its fenced Postgres
    // transaction open (holding the fence) and an etcd write about to be sent.
    let mut hanging = elected(&env);
    hanging
        .extra_env
        .push(("M3O_FAILPOINTS".into(), "stop-before-etcd-write".into()));
    let first = env.start_operator_with(hanging).await;
    wait_leader(&first, "the first replica to lead", Duration::from_secs(20)).await;
    let second = env.start_operator_with(elected(&env)).await;
    let (old_epoch, old_app) = term(&env).await;

    env.apply_customer("early", json!({"email": "early@example.com"}))
        .await;
    wait_stopped(&first).await;
    let stopped_at = Instant::now();
    wait_leader(&second, "the standby to lead", LEASE + TAKEOVER_SLACK).await;
    eprintln!(
        "leader SIGSTOPped mid-transaction -> standby leading after {:?} (lease {LEASE:?})",
        stopped_at.elapsed()
    );
    let (new_epoch, new_app) = term(&env).await;
    assert!(new_epoch > old_epoch && new_app != old_app);

    let early = env.wait_ready("early").await;
    let id = early
        .status
        .and_then(|s| s.customer_id)
        .expect("customer id");
    // A change the hung leader has not seen: the etcd write it holds is now stale.
    env.apply_customer(
        "early",
        json!({"email": "early@example.com", "name": "Changed"}),
    )
    .await;
    env.wait_ready("early").await;
    env.apply_customer("after", json!({"email": "after@example.com"}))
        .await;
    env.wait_ready("after").await;
    second.settle().await;
    let key = m3o_platform_contract::customer_key(&id);
    let revision = env.etcd_mod_revision(&key).await;
    let old_rows = written_in(&env, old_epoch).await;

    first.signal("CONT").await;
    let (status, log) = exit_log(first, "the old leader exits once it wakes").await;
    assert!(!status.success(), "a replaced leader exits non-zero");
    // Woken, it either sends its pending etcd write (refused by etcd's fence) or
    // notices the lost fence first and stops before sending it; which one comes first
    // is up to the scheduler. Either way nothing stale lands (checked below).
    assert!(
        log.contains("another process holds the writer term")
            || log.contains("lost the writer fence"),
        "its pending etcd write was refused, or it stopped first:\n{log}"
    );
    assert_eq!(
        env.etcd_json(&key).await.map(|v| v["name"].clone()),
        Some(json!("Changed")),
        "the old leader's stale value did not reach etcd"
    );
    assert_eq!(env.etcd_mod_revision(&key).await, revision, "no etcd write");
    assert_eq!(
        written_in(&env, old_epoch).await,
        old_rows,
        "no row or outbox row written in the old term after the takeover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_leader_election_one_process_writes_at_a_time() {
    let env = TestEnv::new("two-writers").await;
    // No --leader-election: the fence alone decides, with the same (fast) timings.
    let fast = || Backends {
        extra_args: FAST_TIMINGS.map(String::from).to_vec(),
        ..Default::default()
    };
    let first = env.start_operator_with(fast()).await;
    env.apply_customer("a", json!({"email": "a@example.com"}))
        .await;
    env.wait_ready("a").await;
    let (first_epoch, _) = term(&env).await;

    let second = env.start_operator_with(fast()).await;
    let readyz = http_get(&format!("127.0.0.1:{}", second.port), "/readyz").await;
    let (code, body) = readyz.expect("second /readyz");
    assert_eq!(code, 200, "a waiting process is a ready standby: {body}");
    assert!(body.contains("holds the writer fence"), "{body}");
    env.apply_customer("b", json!({"email": "b@example.com"}))
        .await;
    env.wait_ready("b").await;
    first.settle().await;
    assert_eq!(metric(&second, "m3o_operator_leader").await, 0.0);
    assert!(
        !second
            .metrics()
            .await
            .contains("m3o_operator_reconciles_total{"),
        "the waiting process runs no controller"
    );
    assert_eq!(
        written_in(&env, first_epoch).await.0,
        2,
        "both customers written by the first process"
    );
    let second_log = std::fs::read_to_string(&second.log_path).expect("log");
    assert!(
        second_log.contains("waiting for the writer fence"),
        "{second_log}"
    );

    // A hung writer is taken over once its heartbeat is older than its lease.
    first.signal("STOP").await;
    let stopped_at = Instant::now();
    wait_leader(
        &second,
        "the second process to write",
        LEASE + TAKEOVER_SLACK,
    )
    .await;
    eprintln!(
        "no election: writer SIGSTOPped -> second writing after {:?}",
        stopped_at.elapsed()
    );
    let (second_epoch, _) = term(&env).await;
    env.apply_customer("c", json!({"email": "c@example.com"}))
        .await;
    env.wait_ready("c").await;
    assert_eq!(written_in(&env, second_epoch).await.0, 1, "c by the second");
    let first_rows = written_in(&env, first_epoch).await;
    first.signal("CONT").await;
    let (status, _) = exit_log(first, "the hung writer exits once it wakes").await;
    assert!(!status.success());
    assert_eq!(written_in(&env, first_epoch).await, first_rows);

    // A writer that exits is replaced at once (its sessions are gone).
    let third = env.start_operator_with(fast()).await;
    second.kill().await;
    let killed_at = Instant::now();
    wait_leader(&third, "the third process to write", Duration::from_secs(5)).await;
    eprintln!(
        "no election: writer killed -> next writing after {:?}",
        killed_at.elapsed()
    );
    env.apply_customer("d", json!({"email": "d@example.com"}))
        .await;
    env.wait_ready("d").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_running_task_that_ends_stops_the_process() {
    for (failpoint, message) in [
        (
            "task-end:drift-watcher",
            "task drift-watcher ended unexpectedly",
        ),
        (
            "task-panic:customer-controller",
            "task customer-controller panicked",
        ),
    ] {
        let env = TestEnv::new("task-end").await;
        let op = env.spawn_operator_with(Backends {
            extra_env: vec![("M3O_FAILPOINTS".into(), failpoint.into())],
            ..Default::default()
        });
        let (status, log) = exit_log(op, "the process exits when a task ends").await;
        assert!(!status.success(), "{failpoint}: non-zero exit");
        assert!(
            log.contains(&format!("m3o-operator: error: {message}")),
            "{failpoint}: the exit names the task:\n{log}"
        );
        assert_eq!(
            term(&env).await.1,
            "",
            "{failpoint}: the fence was released for a successor"
        );
    }
}

/// An outbox row as a write to test the fence with.
async fn enqueue(conn: &mut sqlx::PgConnection) -> Result<uuid::Uuid, sqlx::Error> {
    let msg = m3o_events::outbox::OutboxMessage {
        topic: "customers",
        event_type: "EventTypeCreated",
        aggregate_id: "fence-test".into(),
        payload: vec![1, 2, 3],
    };
    m3o_events::outbox::enqueue(conn, &msg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_refuses_an_old_term_and_unchecked_writes() {
    use m3o_controllers::store::{self, fence};

    let env = TestEnv::new("fence-sql").await;
    // Two "processes": two pools, each with its own application_name.
    let pool_a = store::connect(&env.database_url, &env.schema, 3)
        .await
        .expect("pool a");
    let pool_b = store::connect(&env.database_url, &env.schema, 3)
        .await
        .expect("pool b");
    let app = |pool: &sqlx::PgPool| {
        pool.connect_options()
            .get_application_name()
            .expect("application_name")
            .to_owned()
    };
    let (app_a, app_b) = (app(&pool_a), app(&pool_b));
    let candidate = |identity, app| fence::Candidate {
        fence: "",
        identity,
        app,
        lease: Duration::from_secs(60),
    };
    let mut control_a = pool_a.acquire().await.expect("a").detach();
    let mut control_b = pool_b.acquire().await.expect("b").detach();

    let term_a = fence::Term::default();
    let epoch = fence::bump(&mut control_a, &candidate("a", &app_a), 0, LEASE)
        .await
        .expect("a bumps")
        .expect("a begins term 1");
    term_a.begin(epoch);
    let mut tx = fence::begin_write(&pool_a, &term_a)
        .await
        .expect("a checks");
    let id = enqueue(&mut tx).await.expect("a writes");
    tx.commit().await.expect("commit");
    let stamped: Option<i64> = sqlx::query_scalar("SELECT writer_epoch FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&env.db)
        .await
        .expect("row");
    assert_eq!(stamped, Some(epoch), "rows carry their writer's term");
    let unchecked = enqueue(&mut pool_a.acquire().await.expect("conn")).await;
    assert!(
        unchecked.as_ref().is_err_and(fence::is_fenced),
        "a write that skipped the check is refused: {unchecked:?}"
    );

    // A writes; B may not begin a term while A is alive, nor while A's checked
    // transaction is open.
    let mut open = fence::begin_write(&pool_a, &term_a)
        .await
        .expect("a checks");
    let seen = fence::observe(&mut control_b, "").await.expect("observe");
    assert_eq!(fence::decide(&seen, &app_b), fence::Next::Wait, "{seen:?}");
    let blocked = fence::bump(
        &mut control_b,
        &candidate("b", &app_b),
        seen.epoch,
        Duration::from_millis(300),
    )
    .await;
    assert!(
        blocked.as_ref().is_err_and(fence::is_lock_timeout),
        "a new term waits for the open write: {blocked:?}"
    );

    // A hangs (simulated: its heartbeat ages past its lease); B terminates its
    // sessions, which ends the open transaction, and begins term 2.
    sqlx::query("UPDATE writer_fence SET lease_ms = 1, beat_at = now() - interval '1 minute'")
        .execute(&env.db)
        .await
        .expect("age the heartbeat");
    let seen = fence::observe(&mut control_b, "").await.expect("observe");
    assert_eq!(fence::decide(&seen, &app_b), fence::Next::TakeOver);
    assert!(
        fence::terminate(&mut control_b, &app_a)
            .await
            .expect("terminate")
            >= 1
    );
    let epoch_b = fence::bump(&mut control_b, &candidate("b", &app_b), seen.epoch, LEASE)
        .await
        .expect("b bumps")
        .expect("b begins a term");
    assert!(epoch_b > epoch);
    assert!(
        enqueue(&mut open).await.is_err(),
        "A's open transaction is gone"
    );

    // A, awake again, can no longer write, and learns that it was replaced.
    let stale = fence::begin_write(&pool_a, &term_a).await;
    assert!(
        stale.as_ref().is_err_and(fence::is_fenced),
        "{:?}",
        stale.err()
    );
    assert!(term_a.superseded().is_cancelled());
    assert!(
        !fence::beat(&mut control_b, "", epoch).await.expect("beat"),
        "the old term's heartbeat is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elected_replica_waiting_on_the_fence_says_on_what() {
    use m3o_controllers::store;

    let env = TestEnv::new("fence-wait").await;
    // Another writer, alive: a session of its own and a fresh heartbeat.
    let holder = store::connect(&env.database_url, &env.schema, 1)
        .await
        .expect("holder pool");
    let holder_app = holder
        .connect_options()
        .get_application_name()
        .expect("application_name")
        .to_owned();
    sqlx::query(
        "UPDATE writer_fence SET epoch = 7, holder = 'other-writer', holder_app = $1, \
         beat_at = clock_timestamp(), lease_ms = 4000",
    )
    .bind(&holder_app)
    .execute(&holder)
    .await
    .expect("hold the fence");
    let beating = tokio::spawn({
        let holder = holder.clone();
        async move {
            loop {
                let _ = sqlx::query("UPDATE writer_fence SET beat_at = clock_timestamp()")
                    .execute(&holder)
                    .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });

    let op = env.start_operator_with(elected(&env)).await;
    let readyz = || async {
        http_get(&format!("127.0.0.1:{}", op.port), "/readyz")
            .await
            .expect("readyz")
    };
    let (code, body) = eventually(
        "the elected replica to stop calling itself ready",
        LEASE + TAKEOVER_SLACK,
        || async { Some(readyz().await).filter(|(code, _)| *code == 503) },
    )
    .await;
    assert!(body.contains("held by other-writer"), "{code} {body}");
    assert_eq!(metric(&op, "m3o_operator_leader").await, 0.0);

    // The holder hangs: its heartbeat ages past its lease, and it is taken over.
    beating.abort();
    let (epoch, app) = eventually(
        "the replica to take over the fence",
        LEASE + TAKEOVER_SLACK,
        || async { Some(term(&env).await).filter(|(epoch, _)| *epoch > 7) },
    )
    .await;
    assert_ne!(app, holder_app);
    wait_leader(&op, "the replica to lead", Duration::from_secs(10)).await;
    assert_eq!(epoch, 8);
    env.apply_customer("x", json!({"email": "x@example.com"}))
        .await;
    env.wait_ready("x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_mid_batch_is_replaced_within_the_lease() {
    const N: usize = 40;
    let env = TestEnv::new("stop-batch").await;
    let first = env.start_operator_with(elected(&env)).await;
    wait_leader(&first, "the first replica to lead", Duration::from_secs(20)).await;
    let second = env.start_operator_with(elected(&env)).await;
    let (old_epoch, _) = term(&env).await;

    // SIGSTOP from outside while the leader is busy: a hung host, connections open.
    env.apply_customer_batch("stop", N).await;
    eventually("the leader to be busy", Duration::from_secs(60), || async {
        (env.outbox_count().await >= 5).then_some(())
    })
    .await;
    first.signal("STOP").await;
    let stopped_at = Instant::now();
    wait_leader(&second, "the standby to lead", LEASE + TAKEOVER_SLACK).await;
    eprintln!(
        "leader SIGSTOPped mid-batch -> standby leading after {:?} (lease {LEASE:?})",
        stopped_at.elapsed()
    );
    env.apply_customer("after", json!({"email": "after@example.com"}))
        .await;
    env.wait_ready("after").await;
    env.wait_customers_ready(N + 1, Duration::from_secs(120))
        .await;
    second.settle().await;
    let old_rows = written_in(&env, old_epoch).await;

    first.signal("CONT").await;
    let (status, _) = exit_log(first, "the old leader exits once it wakes").await;
    assert!(!status.success());
    assert_eq!(
        written_in(&env, old_epoch).await,
        old_rows,
        "nothing written in the old term after the takeover"
    );
    env.assert_each_customer_created_once(N + 1).await;
}

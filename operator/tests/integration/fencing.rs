//! The writer fence: one writing process per schema with or without leader election;
//! a hung writer (SIGSTOP: its TCP connections stay open) is replaced within the lease
//! and writes nothing once it wakes up; a long-running task that ends stops the process.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::production::{elected, metric, wait_leader};
use crate::support::{Backends, Operator, TestEnv, eventually, http_get};

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
async fn exit_log(op: Operator, what: &str) -> (std::process::ExitStatus, String) {
    let log_path = op.log_path.clone();
    let status = tokio::time::timeout(Duration::from_secs(60), op.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} (log: {})", log_path.display()));
    (status, std::fs::read_to_string(log_path).expect("read log"))
}

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
    let key = format!("customers/{id}");
    let revision = env.etcd_mod_revision(&key).await;
    let old_rows = written_in(&env, old_epoch).await;

    first.signal("CONT").await;
    let (status, log) = exit_log(first, "the old leader exits once it wakes").await;
    assert!(!status.success(), "a replaced leader exits non-zero");
    assert!(
        log.contains("another process holds the writer term"),
        "its pending etcd write was refused:\n{log}"
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
        extra_args: [
            "--leader-election-lease-duration",
            "4s",
            "--leader-election-renew-deadline",
            "3s",
            "--leader-election-retry-period",
            "500ms",
        ]
        .map(String::from)
        .to_vec(),
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

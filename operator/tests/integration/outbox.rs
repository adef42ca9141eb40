//! A poison event through the whole operator: parked with a Warning Event and metrics,
//! the same customer's later event held behind it, both shown by `m3o-operator outbox`
//! and delivered in order after the cause is fixed and the events re-driven.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event as KubeEvent;
use m3o_events::customers::EventType;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::support::operator::Backends;
use crate::support::{TestEnv, eventually};

/// Runs `m3o-operator outbox ARGS` on the test's schema; returns (success, stdout, stderr).
async fn outbox(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_m3o-operator"))
        .arg("outbox")
        .args(args)
        .args(["--database-schema", &env.schema])
        .env("DATABASE_URL", &env.database_url)
        .output()
        .await
        .expect("run m3o-operator outbox");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn outbox_json(env: &TestEnv, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let (ok, stdout, stderr) = outbox(env, &args).await;
    assert!(ok, "outbox {args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("JSON from {args:?}: {e}: {stdout}"))
}

async fn redis(env: &TestEnv, args: &[&str]) {
    let client = redis::Client::open(env.redis_url.as_str()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async::<redis::Value>(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("redis {args:?}: {e}"));
}

#[tokio::test]
async fn poison_event_is_parked_reported_listed_and_redriven() {
    let env = TestEnv::new("outbox").await;
    let key = m3o_events::stream_key(&env.stream_prefix, m3o_events::customers::TOPIC);
    // Every XADD to the customers stream now fails with WRONGTYPE.
    redis(&env, &["SET", &key, "x"]).await;
    let op = env
        .start_operator_with(Backends {
            extra_args: vec!["--outbox-max-attempts".into(), "2".into()],
            ..Backends::default()
        })
        .await;
    op.wait_ready().await;
    env.apply_customer(
        "alice",
        json!({"email": "alice@example.com", "name": "Alice"}),
    )
    .await;
    let alice = env.wait_ready("alice").await;
    let id = alice
        .status
        .and_then(|s| s.customer_id)
        .expect("status.customerId");

    // Parked: a Warning Event on the Customer, the metrics, `outbox list` and `backlog`.
    let events: kube::Api<KubeEvent> = kube::Api::namespaced(env.kube.clone(), &env.ns);
    let warning = eventually(
        "an OutboxEventParked Event",
        Duration::from_secs(30),
        || async {
            let list = events.list(&Default::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("OutboxEventParked")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("alice")
            })
        },
    )
    .await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    let note = warning.note.unwrap_or_default();
    assert!(note.contains("WRONGTYPE"), "{note}");
    assert!(note.contains("EventTypeCreated"), "{note}");
    let parked_id = eventually("alice's row parked", Duration::from_secs(10), || async {
        let rows = outbox_json(&env, &["list"]).await;
        let row = rows.as_array()?.first()?.clone();
        (row["state"] == "parked").then_some(row)
    })
    .await;
    assert_eq!(parked_id["aggregate"], json!(id));
    assert_eq!(parked_id["type"], "EventTypeCreated");
    assert_eq!(parked_id["topic"], "customers");
    assert_eq!(parked_id["attempts"], 2);
    assert!(
        parked_id["lastError"]
            .as_str()
            .unwrap_or("")
            .contains("WRONGTYPE")
    );
    let parked_id = parked_id["id"].as_str().expect("id").to_owned();
    assert!(note.contains(&parked_id), "{note}");
    let metrics = eventually("parked metrics", Duration::from_secs(10), || async {
        let m = op.metrics().await;
        m.contains("m3o_operator_outbox_parked 1").then_some(m)
    })
    .await;
    assert!(
        metrics.contains("m3o_operator_outbox_rows_parked_total 1"),
        "{metrics}"
    );

    // A later event of the same customer waits behind the parked one.
    env.apply_customer(
        "alice",
        json!({"email": "alice@example.com", "name": "Alice B"}),
    )
    .await;
    let rows = eventually("alice's update held", Duration::from_secs(30), || async {
        let rows = outbox_json(&env, &["list"]).await;
        (rows.as_array()?.len() == 2).then_some(rows)
    })
    .await;
    assert_eq!(rows[1]["state"], "held");
    assert_eq!(rows[1]["type"], "EventTypeUpdated");
    assert_eq!(rows[1]["attempts"], 0);
    let (ok, text, _) = outbox(&env, &["list"]).await;
    assert!(ok);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("LAST ERROR"),
        "{text}"
    );
    assert!(
        lines[1].starts_with(&parked_id) && lines[1].contains("  parked  "),
        "{text}"
    );
    assert!(
        lines[2].contains("EventTypeUpdated") && lines[2].contains("  held  "),
        "{text}"
    );
    let backlog = outbox_json(&env, &["backlog"]).await;
    assert_eq!(backlog[0]["topic"], "customers");
    assert_eq!(
        (
            backlog[0]["pending"].as_i64(),
            backlog[0]["parked"].as_i64()
        ),
        (Some(1), Some(1))
    );
    let (_, text, _) = outbox(&env, &["backlog"]).await;
    let row: Vec<&str> = text
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!((row[0], row[1], row[3]), ("customers", "1", "1"), "{text}");

    // An id that is not parked is named, and nothing is done for it.
    let stranger = uuid::Uuid::new_v4().to_string();
    let (ok, _, stderr) = outbox(&env, &["redrive", "--id", &stranger]).await;
    assert!(
        !ok && stderr.contains(&stranger) && stderr.contains("--id"),
        "{stderr}"
    );

    // Fixed and re-driven: Created, then Updated, and a consumer group's lag is exported.
    redis(&env, &["DEL", &key]).await;
    redis(
        &env,
        &["XGROUP", "CREATE", &key, "billing", "0", "MKSTREAM"],
    )
    .await;
    let (ok, text, stderr) = outbox(&env, &["redrive", "--id", &parked_id]).await;
    assert!(ok, "{stderr}");
    assert!(
        text.starts_with(&format!("re-drove {parked_id} ")),
        "{text}"
    );
    assert!(text.contains("1 parked event(s) re-driven"), "{text}");
    let delivered = env.wait_events(2).await;
    let types: Vec<&str> = delivered.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            EventType::Created.as_str_name(),
            EventType::Updated.as_str_name()
        ]
    );
    assert_eq!(delivered[0].id.to_string(), parked_id);
    // Marked published just after the XADD returned.
    eventually("an empty backlog", Duration::from_secs(10), || async {
        let (ok, text, _) = outbox(&env, &["backlog"]).await;
        (ok && text == "outbox empty: every event is published\n").then_some(())
    })
    .await;
    let lag =
        format!("m3o_operator_stream_consumer_group_lag{{stream=\"{key}\",group=\"billing\"}} 2");
    eventually(
        "the billing group's lag exported",
        Duration::from_secs(30),
        || async { op.metrics().await.contains(&lag).then_some(()) },
    )
    .await;
    op.stop().await;
}

/// Whether process `pid` is stopped (SIGSTOP: state `T` in `/proc/<pid>/stat`).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

/// `outbox replay` holds the schema's relays back while it re-sends: an event committed
/// meanwhile is published after every replayed one, not between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_holds_the_relay_back_so_a_newer_event_follows_the_replayed_ones() {
    let env = TestEnv::new("replay-order").await;
    let _op = env.start_operator().await;
    let since = chrono::Utc::now() - chrono::Duration::seconds(5);
    env.apply_customer("alice", json!({"email": "alice@example.com"}))
        .await;
    env.wait_ready("alice").await;
    let alice = env.wait_events(1).await[0].id;

    // The replay stops (SIGSTOP) right after pausing the relays, before it re-sends.
    let replay = Command::new(env!("CARGO_BIN_EXE_m3o-operator"))
        .args(["outbox", "replay", "--since", &since.to_rfc3339()])
        .args(["--database-schema", &env.schema])
        .args(["--stream-prefix", &env.stream_prefix])
        .env("DATABASE_URL", &env.database_url)
        .env("REDIS_URL", &env.redis_url)
        .env("M3O_FAILPOINTS", "replay-relays-paused")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run outbox replay");
    let pid = replay.id().expect("a running replay");
    eventually(
        "the replay to stop with the relays paused",
        Duration::from_secs(30),
        || async { stopped(pid).then_some(()) },
    )
    .await;
    // Bob's event is committed while the relays are held back.
    env.apply_customer("bob", json!({"email": "bob@example.com"}))
        .await;
    env.wait_ready("bob").await;
    let status = Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status()
        .await
        .expect("kill -CONT");
    assert!(status.success());
    let out = tokio::time::timeout(Duration::from_secs(60), replay.wait_with_output())
        .await
        .expect("the replay ends")
        .expect("replay output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let events = env.wait_events(2).await;
    let bob = events
        .iter()
        .find(|e| e.id != alice)
        .map(|e| e.id)
        .expect("bob's event");
    let stream: Vec<_> = env.stream_events().await.iter().map(|e| e.id).collect();
    let alice_at: Vec<usize> = (0..stream.len()).filter(|&i| stream[i] == alice).collect();
    let bob_at = stream
        .iter()
        .position(|id| *id == bob)
        .expect("bob's event on the stream");
    assert_eq!(
        alice_at.len(),
        2,
        "alice's event and its replay: {stream:?}"
    );
    assert!(
        alice_at[1] < bob_at,
        "the newer event follows the replayed one: {stream:?}"
    );
}

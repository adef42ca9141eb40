//! Start-up in bulk and rows repaired: a restart over an unchanged fleet reconciles
//! nothing and writes nothing (API server, Postgres, etcd), while what changed while
//! the operator was down (a spec, a row edited by hand, the plan catalog) is
//! reconciled and repaired; a row edited by hand under a running operator is repaired
//! by the next bulk resync.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::ResourceExt;
use serde_json::json;

use crate::apikey::{key_id, key_spec};
use crate::subscription::assert_in_force;
use crate::support::{Backends, Operator, TestEnv, eventually};

/// The sum of a counter's series for `kind` (`m3o_operator_<name>_total{kind=...}`).
async fn counter(op: &Operator, name: &str, kind: &str) -> f64 {
    let prefix = format!("m3o_operator_{name}_total{{kind=\"{kind}\"}} ");
    let metrics = op.metrics().await;
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

/// Waits until the bulk comparison has run at least once for every kind (at start,
/// after the watches' first list), then until no reconcile has run for a second.
async fn compared_and_settled(op: &Operator) {
    for kind in ["Customer", "Subscription", "ApiKey"] {
        eventually(
            &format!("a bulk comparison of {kind}"),
            Duration::from_secs(30),
            || async { (counter(op, "object_resyncs", kind).await >= 1.0).then_some(()) },
        )
        .await;
    }
    op.settle().await;
}

/// Runs `sql` (binding `id`) as a hand edit through the writer fence's bypass: under
/// the current term, as the operator's own transactions are stamped.
async fn hand_edit(env: &TestEnv, sql: &str, id: &str) {
    let mut tx = env.db.begin().await.expect("begin");
    sqlx::query(
        "SELECT set_config('m3o.writer_epoch', (SELECT max(epoch) FROM writer_fence)::text, true)",
    )
    .execute(&mut *tx)
    .await
    .expect("the current term");
    let done = sqlx::query(sql)
        .bind(id)
        .execute(&mut *tx)
        .await
        .expect("hand edit");
    assert_eq!(done.rows_affected(), 1, "{sql}");
    tx.commit().await.expect("commit");
}

/// Everything an idle restart must leave alone: each object's resourceVersion (status
/// included) and its rows, and each etcd key's mod revision under the test's prefix.
async fn snapshot(env: &TestEnv) -> (BTreeMap<String, String>, Vec<String>, BTreeMap<String, i64>) {
    let mut versions = BTreeMap::new();
    let lp = Default::default();
    for c in env.customers().list(&lp).await.expect("customers") {
        versions.insert(
            format!("Customer/{}", c.name_any()),
            c.resource_version().unwrap_or_default(),
        );
    }
    for s in env.subscriptions().list(&lp).await.expect("subscriptions") {
        versions.insert(
            format!("Subscription/{}", s.name_any()),
            s.resource_version().unwrap_or_default(),
        );
    }
    for k in env.apikeys().list(&lp).await.expect("apikeys") {
        versions.insert(
            format!("ApiKey/{}", k.name_any()),
            k.resource_version().unwrap_or_default(),
        );
    }
    // Whole rows (updated_at, writer_epoch, config_revision included), and the number
    // of events: the relay's own bookkeeping on the outbox is not a record write.
    let mut rows = Vec::new();
    for table in ["customers", "subscriptions", "api_keys"] {
        let mut more: Vec<String> =
            sqlx::query_scalar(&format!("SELECT t::text FROM {table} t ORDER BY 1"))
                .fetch_all(&env.db)
                .await
                .expect("rows");
        rows.append(&mut more);
    }
    rows.push(format!("outbox rows: {}", env.outbox_count().await));
    let options = etcd_client::GetOptions::new().with_prefix();
    let resp = env
        .etcd
        .kv_client()
        .get(format!("{}/", env.etcd_prefix), Some(options))
        .await
        .expect("etcd list");
    let revisions = resp
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().expect("utf-8").to_owned(), kv.mod_revision()))
        .collect();
    (versions, rows, revisions)
}

/// Writes `yaml` to `path` the way a ConfigMap update lands: a new file renamed over it.
fn write_plans(path: &Path, yaml: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).expect("write plans");
    std::fs::rename(&tmp, path).expect("swap plans");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_over_an_unchanged_fleet_reconciles_nothing_and_what_changed_meanwhile_is_reconciled()
 {
    let env = TestEnv::new("restart-bulk").await;
    let op = env.start_operator().await;
    for name in ["alice", "bob", "carol"] {
        env.customer_with_pro_subscription(name).await;
    }
    env.apply_apikey("ci", key_spec(json!({}))).await;
    env.wait_apikey("ci", "True", "Provisioned").await;
    op.settle().await;
    assert!(op.stop().await.success());

    // An idle restart: nothing reconciled, nothing written anywhere.
    let before = snapshot(&env).await;
    let op = env.start_operator().await;
    compared_and_settled(&op).await;
    for kind in ["Customer", "Subscription", "ApiKey"] {
        assert_eq!(
            counter(&op, "reconciles", kind).await,
            0.0,
            "{kind} reconciles"
        );
    }
    let after = snapshot(&env).await;
    assert_eq!(after.0, before.0, "no API write (resourceVersions)");
    assert_eq!(after.1, before.1, "no Postgres write (rows)");
    assert_eq!(after.2, before.2, "no etcd write (mod revisions)");
    assert!(op.stop().await.success());

    // A spec edited while the operator was down is reconciled after the restart; the
    // rest is still left alone.
    env.apply_customer("bob", json!({"email": env.customers().get("bob").await.expect("bob").spec.email, "name": "Bob B"}))
        .await;
    let op = env.start_operator().await;
    eventually(
        "bob's new name in its row",
        Duration::from_secs(20),
        || async { (env.row("bob").await?.name == "Bob B").then_some(()) },
    )
    .await;
    env.wait_ready("bob").await;
    compared_and_settled(&op).await;
    assert_eq!(
        counter(&op, "reconciles", "Customer").await,
        1.0,
        "bob only"
    );
    // bob's Subscription looks again once its Customer's record changed (the feed
    // passes a new observedGeneration to dependents); alice's and carol's are left alone.
    assert_eq!(
        counter(&op, "reconciles", "Subscription").await,
        1.0,
        "bob's only"
    );
    assert_eq!(counter(&op, "reconciles", "ApiKey").await, 0.0);
}

/// An operator resyncing every 2 s, and customer alice Ready.
async fn resyncing_every_2s(name: &str) -> (TestEnv, Operator) {
    let env = TestEnv::new(name).await;
    let op = env
        .start_operator_with(Backends {
            extra_args: vec!["--resync-interval".into(), "2s".into()],
            ..Default::default()
        })
        .await;
    env.customer_ready("alice", "Active").await;
    (env, op)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_edited_by_hand_is_repaired_by_the_next_resync() {
    let (env, op) = resyncing_every_2s("restart-repair").await;
    env.apply_apikey(
        "ci",
        key_spec(json!({"blocked": true, "blockedMessage": "unpaid"})),
    )
    .await;
    let id = key_id(&env.wait_apikey("ci", "True", "Blocked").await);
    let key = env.secret_key("ci-api-key").await.expect("key");
    env.wait_key_events(&id, &["EventTypeGenerateKey", "EventTypeBlockKey"])
        .await;
    assert_eq!(env.key_row_status(&id).await, "blocked");
    // Compared and found in order since: the periodic comparison no longer reads the
    // row, and must find the edit by the row's version.
    let compared = counter(&op, "object_resyncs", "ApiKey").await;
    eventually(
        "two resyncs after provisioning",
        Duration::from_secs(30),
        || async {
            (counter(&op, "object_resyncs", "ApiKey").await >= compared + 2.0).then_some(())
        },
    )
    .await;

    // Set back to active by hand, under the fence's current term.
    hand_edit(
        &env,
        "UPDATE api_keys SET status = 'active', blocked_message = '' WHERE id = $1::uuid",
        &id,
    )
    .await;
    eventually(
        "the key's row blocked again",
        Duration::from_secs(30),
        || async { (env.key_row_status(&id).await == "blocked").then_some(()) },
    )
    .await;
    assert!(counter(&op, "rows_repaired", "ApiKey").await >= 1.0);
    // Through the normal pipeline: the event of the repair, and the gateway entry.
    env.wait_key_events(
        &id,
        &[
            "EventTypeGenerateKey",
            "EventTypeBlockKey",
            "EventTypeBlockKey",
        ],
    )
    .await;
    eventually(
        "the key's entry blocked",
        Duration::from_secs(30),
        || async { (env.gateway_entry(&key).await?["status"] == json!("blocked")).then_some(()) },
    )
    .await;
    // Repaired once: the next resyncs find it matching its plan.
    let repaired = counter(&op, "rows_repaired", "ApiKey").await;
    let compared = counter(&op, "object_resyncs", "ApiKey").await;
    eventually("two more resyncs", Duration::from_secs(30), || async {
        (counter(&op, "object_resyncs", "ApiKey").await >= compared + 2.0).then_some(())
    })
    .await;
    assert_eq!(counter(&op, "rows_repaired", "ApiKey").await, repaired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rows_identity_edited_by_hand_is_repaired_by_the_next_resync() {
    let (env, op) = resyncing_every_2s("restart-repair-identity").await;
    env.apply_apikey("ci", key_spec(json!({}))).await;
    let id = key_id(&env.wait_apikey("ci", "True", "Provisioned").await);
    let identity = || async {
        let row: (String, i64) = sqlx::query_as(
            "SELECT customer_id::text, rotation_generation FROM api_keys WHERE id = $1::uuid",
        )
        .bind(&id)
        .fetch_one(&env.db)
        .await
        .expect("key row");
        row
    };
    let before = identity().await;
    // The rotation generation moved by hand, under the fence's current term (the
    // plan's fields, status and all, are untouched).
    hand_edit(
        &env,
        "UPDATE api_keys SET rotation_generation = rotation_generation + 7 WHERE id = $1::uuid",
        &id,
    )
    .await;
    assert_ne!(identity().await, before);
    eventually(
        "the key's rotation generation repaired",
        Duration::from_secs(30),
        || async { (identity().await == before).then_some(()) },
    )
    .await;
    assert!(counter(&op, "rows_repaired", "ApiKey").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_edited_and_a_catalog_changed_while_the_operator_was_down_are_repaired_after_the_restart()
 {
    let env = TestEnv::new("restart-down").await;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(&env.ns);
    std::fs::create_dir_all(&dir).expect("plans dir");
    let plans = dir.join("plans.yaml");
    write_plans(
        &plans,
        "plans:\n  starter: {monthlyRequests: 100, requestsPerSecond: 1}\n  pro: {monthlyRequests: 500, requestsPerSecond: 5}\n",
    );
    // The default resync interval (30 s) is longer than the waits below: the repairs
    // come from the start-up comparison.
    let with_plans = || Backends {
        extra_args: vec!["--plans-file".into(), plans.display().to_string()],
        ..Default::default()
    };
    let op = env.start_operator_with(with_plans()).await;
    let alice = env.ready_customer("alice").await;
    env.apply_subscription(
        "alice",
        json!({"customerRef": {"name": "alice"}, "plan": "starter"}),
    )
    .await;
    assert_in_force(&env, "alice", &alice, "starter", (100, 1)).await;
    let bob = env.ready_customer("bob").await;
    env.apply_subscription(
        "bob",
        json!({"customerRef": {"name": "bob"}, "plan": "pro"}),
    )
    .await;
    assert_in_force(&env, "bob", &bob, "pro", (500, 5)).await;
    op.settle().await;
    assert!(op.stop().await.success());

    // While down: alice's row renamed by hand, and the catalog's starter plan raised.
    hand_edit(
        &env,
        "UPDATE customers SET name = 'Mallory' WHERE id = $1::uuid",
        &alice,
    )
    .await;
    write_plans(
        &plans,
        "plans:\n  starter: {monthlyRequests: 200, requestsPerSecond: 2}\n  pro: {monthlyRequests: 500, requestsPerSecond: 5}\n",
    );
    let bob_before = env.subscription_row("bob").await.expect("bob's row");

    let op = env.start_operator_with(with_plans()).await;
    eventually("alice's row repaired", Duration::from_secs(20), || async {
        (env.row("alice").await?.name.is_empty()).then_some(())
    })
    .await;
    assert_in_force(&env, "alice", &alice, "starter", (200, 2)).await;
    compared_and_settled(&op).await;
    assert_eq!(counter(&op, "rows_repaired", "Customer").await, 1.0);
    assert_eq!(counter(&op, "rows_repaired", "Subscription").await, 1.0);
    // bob's plan did not change: its row was left alone.
    assert_eq!(
        env.subscription_row("bob").await.expect("bob's row"),
        bob_before
    );
}

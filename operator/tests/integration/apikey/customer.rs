//! The customer's state reaches its keys; a crash never leaves two keys.

use std::time::Duration;

use kube::api::DeleteParams;
use m3o_controllers::apikey::secret::hash;
use serde_json::json;

use super::*;
use crate::support::{Backends, TestEnv, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_customer_decides_whether_its_keys_work() {
    let env = TestEnv::new("key-cust").await;
    let _op = env.start_operator().await;
    // A key before its customer waits, then works once the customer is Ready.
    env.apply_apikey("ci", key_spec(json!({}))).await;
    env.wait_apikey("ci", "False", "CustomerNotFound").await;
    assert_eq!(env.etcd_keys().await.len(), 0);
    env.customer_ready("alice", "Active").await;
    let id = key_id(&env.wait_apikey("ci", "True", "Provisioned").await);
    let key = env.secret_key("ci-api-key").await.expect("key");

    env.customer_ready("alice", "Banned").await;
    eventually(
        "banned customer's key blocked",
        Duration::from_secs(20),
        || async { (env.gateway_entry(&key).await?["status"] == json!("blocked")).then_some(()) },
    )
    .await;
    env.wait_apikey("ci", "True", "Blocked").await;
    assert_eq!(env.key_row_status(&id).await, "blocked");

    env.customer_ready("alice", "Active").await;
    eventually(
        "unbanned customer's key active",
        Duration::from_secs(20),
        || async { (env.gateway_entry(&key).await?["status"] == json!("active")).then_some(()) },
    )
    .await;
    env.wait_apikey("ci", "True", "Provisioned").await;

    env.customers()
        .delete("alice", &DeleteParams::default())
        .await
        .expect("delete customer");
    eventually(
        "deleted customer's key revoked",
        Duration::from_secs(30),
        || async { env.gateway_entry(&key).await.is_none().then_some(()) },
    )
    .await;
    let k = env.wait_apikey("ci", "False", "CustomerNotFound").await;
    assert_eq!(
        serde_json::to_value(k.status.and_then(|s| s.state)).expect("state"),
        json!("revoked")
    );
    eventually("row revoked", Duration::from_secs(20), || async {
        (env.key_row_status(&id).await == "revoked").then_some(())
    })
    .await;
    env.wait_key_events(
        &id,
        &[
            "EventTypeGenerateKey",
            "EventTypeBlockKey",
            "EventTypeUnblockKey",
            "EventTypeDeleteKey",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_secret_and_database_keeps_one_key() {
    let env = TestEnv::new("key-crash").await;
    let op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    op.stop().await;

    let crashing = Backends {
        extra_env: vec![("M3O_FAILPOINTS".into(), "apikey-secret-written".into())],
        ..Default::default()
    };
    let op = env.start_operator_with(crashing).await;
    env.apply_apikey("ci", key_spec(json!({}))).await;
    let key = eventually(
        "the key written to the Secret",
        Duration::from_secs(30),
        || env.secret_key("ci-api-key"),
    )
    .await;
    let exited = tokio::time::timeout(Duration::from_secs(10), op.wait())
        .await
        .expect("operator aborted at the failpoint");
    assert!(!exited.success());
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&env.db)
        .await
        .expect("count");
    assert_eq!(rows, 0, "crashed before Postgres");

    let _op = env.start_operator().await;
    let k = env.wait_apikey("ci", "True", "Provisioned").await;
    assert_eq!(
        env.secret_key("ci-api-key").await.as_deref(),
        Some(key.as_str()),
        "the Secret's key was reused"
    );
    let hashes: Vec<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys")
        .fetch_all(&env.db)
        .await
        .expect("rows");
    assert_eq!(
        hashes,
        vec![hash(key.as_bytes())],
        "one key, the one in the Secret"
    );
    let keys = env.etcd_keys().await;
    let apikeys: Vec<_> = keys.iter().filter(|k| k.contains("/apikeys/")).collect();
    assert_eq!(apikeys.len(), 1, "no orphan hashes: {keys:?}");
    assert_eq!(
        env.gateway_entry(&key).await.map(|e| e["status"].clone()),
        Some(json!("active"))
    );
    assert_eq!(
        env.key_events(&key_id(&k)).await,
        vec!["EventTypeGenerateKey"]
    );
}

//! The Secret tamper check: a key the operator did not issue never authenticates, a key
//! it recorded keeps working whatever its format.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::*;
use crate::support::{TestEnv, eventually};

/// Merge-patches the ApiKey's Secret (an edit by hand).
async fn edit_secret(env: &TestEnv, patch: serde_json::Value) {
    Api::<Secret>::namespaced(env.kube.clone(), &env.ns)
        .patch("ci-api-key", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("edit the Secret");
}

/// Writes `key` into the Secret with a hash annotation that matches it (what someone
/// who knows the format would forge), and optionally a new keyId.
async fn forge(env: &TestEnv, key: &str, key_id: Option<&str>) {
    let mut string_data = json!({"apiKey": key});
    if let Some(id) = key_id {
        string_data["keyId"] = json!(id);
    }
    let patch = json!({
        "metadata": {"annotations": {"m3o.com/key-sha256": hash(key.as_bytes())}},
        "stringData": string_data,
    });
    edit_secret(env, patch).await;
}

/// Waits until the Secret holds a key other than `forged` and `old` under a new key id,
/// recorded and active; returns it.
async fn replaced(env: &TestEnv, forged: &str, old: &str, old_id: &str) -> String {
    let fresh = eventually(
        "a fresh key in the Secret",
        Duration::from_secs(30),
        || async {
            let key = env.secret_key("ci-api-key").await?;
            (key != forged && key != old).then_some(key)
        },
    )
    .await;
    env.wait_apikey_where("ci", "True", "Provisioned", "with a new key id", |k| {
        k.status
            .as_ref()
            .and_then(|s| s.key_id.as_deref())
            .is_some_and(|id| id != old_id)
    })
    .await;
    assert_eq!(
        env.gateway_entry(forged).await,
        None,
        "the forged key never authenticates"
    );
    assert_eq!(
        env.gateway_entry(&fresh).await.map(|e| e["status"].clone()),
        Some(json!("active"))
    );
    fresh
}

/// Customer alice Active and ApiKey ci provisioned: its key id and key.
async fn provisioned_key(env: &TestEnv) -> (String, String) {
    env.customer_ready("alice", "Active").await;
    env.apply_apikey("ci", key_spec(json!({}))).await;
    let id = key_id(&env.wait_apikey("ci", "True", "Provisioned").await);
    let key = env.secret_key("ci-api-key").await.expect("key");
    (id, key)
}

/// Waits until the replaced key `old` (id `old_id`) is revoked and its entry gone.
async fn wait_revoked(env: &TestEnv, old: &str, old_id: &str) {
    eventually(
        "the replaced key revoked and its entry gone",
        Duration::from_secs(20),
        || async {
            (env.gateway_entry(old).await.is_none()
                && env.key_row_status(old_id).await == "revoked")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_secret_gets_a_fresh_key_and_the_edit_never_works() {
    let env = TestEnv::new("key-edit").await;
    let _op = env.start_operator().await;
    let (old_id, old) = provisioned_key(&env).await;

    // Someone writes a key of their own choosing into the Secret.
    let forged = "m3o_chosen-by-hand-not-by-the-operator-000000";
    edit_secret(&env, json!({"stringData": {"apiKey": forged}})).await;
    replaced(&env, forged, &old, &old_id).await;
    wait_revoked(&env, &old, &old_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_secret_gets_a_fresh_key_and_the_old_one_is_revoked() {
    let env = TestEnv::new("key-del-secret").await;
    let _op = env.start_operator().await;
    let (old_id, old) = provisioned_key(&env).await;

    Api::<Secret>::namespaced(env.kube.clone(), &env.ns)
        .delete("ci-api-key", &Default::default())
        .await
        .expect("delete the Secret");
    replaced(&env, "", &old, &old_id).await;
    // Nothing else changes after the fresh Secret is written: the old key's revocation
    // must come from the reconcile that replaced it.
    wait_revoked(&env, &old, &old_id).await;
    env.wait_key_events(
        &old_id,
        &[
            "EventTypeGenerateKey",
            "EventTypeKeyRotated",
            "EventTypeDeleteKey",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_key_with_a_matching_annotation_is_replaced() {
    let env = TestEnv::new("key-forge").await;
    let _op = env.start_operator().await;
    let (old_id, old) = provisioned_key(&env).await;

    // Same key id: the record's hash tells the forgery.
    forge(&env, "m3o_x", None).await;
    let fresh = replaced(&env, "m3o_x", &old, &old_id).await;
    let fresh_id = key_id(&env.apikeys().get("ci").await.expect("get"));

    // A new key id nothing recorded: only a well-formed key would be taken.
    let unrecorded = uuid::Uuid::now_v7().to_string();
    forge(&env, "m3o_xyzzy", Some(&unrecorded)).await;
    replaced(&env, "m3o_xyzzy", &fresh, &fresh_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_key_of_the_old_format_keeps_working() {
    let env = TestEnv::new("key-legacy").await;
    let op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey("ci", key_spec(json!({}))).await;
    let id = key_id(&env.wait_apikey("ci", "True", "Provisioned").await);
    op.stop().await;

    // A key as issued before the checksum format (base64url, no checksum), recorded.
    let legacy = "m3o_Zm9yLXRoZS1yZWNvcmQtYmVmb3JlLXRoZS1jaGVja3N1bQ";
    // As the operator of that time wrote it: under the writer fence's current term.
    let mut tx = env.db.begin().await.expect("begin");
    sqlx::query(
        "SELECT set_config('m3o.writer_epoch', (SELECT max(epoch) FROM writer_fence)::text, true)",
    )
    .execute(&mut *tx)
    .await
    .expect("the current term");
    sqlx::query("UPDATE api_keys SET key_hash = $2 WHERE id = $1::uuid")
        .bind(&id)
        .bind(hash(legacy.as_bytes()))
        .execute(&mut *tx)
        .await
        .expect("record the legacy key");
    tx.commit().await.expect("commit");
    forge(&env, legacy, None).await;

    let _op = env.start_operator().await;
    // A spec change makes sure a reconcile ran on the legacy key.
    env.apply_apikey("ci", key_spec(json!({"description": "CI key, legacy"})))
        .await;
    let k = env.wait_apikey("ci", "True", "Provisioned").await;
    assert_eq!(key_id(&k), id, "not re-issued");
    assert_eq!(env.secret_key("ci-api-key").await.as_deref(), Some(legacy));
    eventually(
        "the legacy key's entry active",
        Duration::from_secs(30),
        || async { (env.gateway_entry(legacy).await?["status"] == json!("active")).then_some(()) },
    )
    .await;
}

/// A start reconciles only what its bulk comparison finds due; what happened to the
/// Secrets while the operator was down is found by the Secret watch's first list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_edited_or_deleted_while_the_operator_was_down_is_repaired_at_start() {
    let env = TestEnv::new("key-down").await;
    let op = env.start_operator().await;
    let (old_id, old) = provisioned_key(&env).await;
    op.settle().await;
    assert!(op.stop().await.success());

    // Edited while down (the default resync interval, 30 s, is longer than the wait).
    forge(&env, "m3o_x", None).await;
    let op = env.start_operator().await;
    let fresh = replaced(&env, "m3o_x", &old, &old_id).await;
    let fresh_id = key_id(&env.apikeys().get("ci").await.expect("get"));
    op.settle().await;
    assert!(op.stop().await.success());

    // Deleted while down.
    Api::<Secret>::namespaced(env.kube.clone(), &env.ns)
        .delete("ci-api-key", &Default::default())
        .await
        .expect("delete the Secret");
    let _op = env.start_operator().await;
    eventually("a key in a new Secret", Duration::from_secs(20), || async {
        let key = env.secret_key("ci-api-key").await?;
        (key != fresh).then_some(())
    })
    .await;
    env.wait_apikey_where("ci", "True", "Provisioned", "with a new key id", |k| {
        k.status
            .as_ref()
            .and_then(|s| s.key_id.as_deref())
            .is_some_and(|id| id != fresh_id)
    })
    .await;
}

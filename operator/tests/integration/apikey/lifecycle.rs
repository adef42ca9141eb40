//! Block, unblock, expire, rotate, revoke, orphan: each on every side.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;

use super::*;
use crate::support::{TestEnv, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_unblock_and_expire() {
    let env = TestEnv::new("key-block").await;
    let _op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey("ci", key_spec(json!({}))).await;
    let id = key_id(&env.wait_apikey("ci", "True", "Provisioned").await);
    let key = env.secret_key("ci-api-key").await.expect("key");

    env.apply_apikey(
        "ci",
        key_spec(json!({"blocked": true, "blockedMessage": "abuse"})),
    )
    .await;
    let k = env.wait_apikey("ci", "True", "Blocked").await;
    let ready = ready_condition(&k);
    assert!(ready.message.ends_with(": abuse"), "{}", ready.message);
    assert_eq!(
        serde_json::to_value(k.status.and_then(|s| s.state)).expect("state"),
        json!("blocked")
    );
    let entry = env.gateway_entry(&key).await.expect("entry");
    assert_eq!(entry["status"], json!("blocked"));
    assert_eq!(
        entry["blockedMessage"],
        json!("abuse"),
        "the gateway can say why"
    );
    assert_eq!(env.key_row_status(&id).await, "blocked");
    env.wait_key_events(&id, &["EventTypeGenerateKey", "EventTypeBlockKey"])
        .await;
    let block = crate::support::dedupe(env.stream_events().await)
        .into_iter()
        .find_map(|e| e.event.block_key)
        .expect("BlockKey");
    assert_eq!(
        (block.id.as_str(), block.message.as_str()),
        (id.as_str(), "abuse")
    );

    env.apply_apikey("ci", key_spec(json!({"blocked": false})))
        .await;
    env.wait_apikey("ci", "True", "Provisioned").await;
    let entry = env.gateway_entry(&key).await.expect("entry");
    assert_eq!(entry["status"], json!("active"));
    assert!(entry.get("blockedMessage").is_none(), "{entry}");
    assert_eq!(env.key_row_status(&id).await, "active");
    env.wait_key_events(
        &id,
        &[
            "EventTypeGenerateKey",
            "EventTypeBlockKey",
            "EventTypeUnblockKey",
        ],
    )
    .await;

    // Expiry a few seconds out: nothing else changes, the gateway entry still stops being active.
    let at = chrono::Utc::now() + chrono::Duration::seconds(4);
    let at = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    env.apply_apikey("ci", key_spec(json!({"expiresAt": at})))
        .await;
    env.wait_apikey("ci", "True", "Provisioned").await;
    assert_eq!(
        env.gateway_entry(&key)
            .await
            .map(|e| e["expiresAt"].clone()),
        Some(json!(at))
    );
    let k = env.wait_apikey("ci", "False", "Expired").await;
    assert_eq!(
        serde_json::to_value(k.status.and_then(|s| s.state)).expect("state"),
        json!("expired")
    );
    assert_eq!(
        env.gateway_entry(&key).await.map(|e| e["status"].clone()),
        Some(json!("expired"))
    );
    assert_eq!(env.key_row_status(&id).await, "expired");
    env.wait_key_events(
        &id,
        &[
            "EventTypeGenerateKey",
            "EventTypeBlockKey",
            "EventTypeUnblockKey",
            "EventTypeKeyExpired",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_old_key_for_the_grace_period_and_delete_revokes() {
    let env = TestEnv::new("key-rotate").await;
    let _op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey("ci", key_spec(json!({"rotationGracePeriod": "4s"})))
        .await;
    let old_id = key_id(&env.wait_apikey("ci", "True", "Provisioned").await);
    let old = env.secret_key("ci-api-key").await.expect("key");

    env.apply_apikey(
        "ci",
        key_spec(json!({"rotationGracePeriod": "4s", "rotationGeneration": 1})),
    )
    .await;
    let k = env.wait_apikey("ci", "True", "Provisioned").await;
    let new_id = key_id(&k);
    assert_ne!(new_id, old_id);
    let new = env.secret_key("ci-api-key").await.expect("key");
    assert_ne!(new, old, "a new key in the Secret");
    assert_eq!(
        env.gateway_entry(&new).await.map(|e| e["status"].clone()),
        Some(json!("active"))
    );
    let during = env
        .gateway_entry(&old)
        .await
        .expect("old key still known during grace");
    assert_eq!(during["status"], json!("active"));
    assert!(
        during["expiresAt"].is_string(),
        "the gateway sees when the grace ends"
    );
    env.wait_key_events(&old_id, &["EventTypeGenerateKey", "EventTypeKeyRotated"])
        .await;

    eventually(
        "old key gone after grace",
        Duration::from_secs(20),
        || async { env.gateway_entry(&old).await.is_none().then_some(()) },
    )
    .await;
    env.wait_key_events(
        &old_id,
        &[
            "EventTypeGenerateKey",
            "EventTypeKeyRotated",
            "EventTypeDeleteKey",
        ],
    )
    .await;
    assert_eq!(env.key_row_status(&old_id).await, "revoked");
    assert!(env.gateway_entry(&new).await.is_some());

    env.apikeys()
        .delete("ci", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("ApiKey gone", Duration::from_secs(30), || async {
        env.apikeys()
            .get_opt("ci")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(env.key_row_status(&new_id).await, "revoked");
    assert_eq!(env.gateway_entry(&new).await, None);
    assert_eq!(env.secret_key("ci-api-key").await, None, "Secret deleted");
    env.wait_key_events(&new_id, &["EventTypeGenerateKey", "EventTypeDeleteKey"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_keeps_the_key_working_and_detaches_its_secret() {
    let env = TestEnv::new("key-orphan").await;
    let _op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey(
        "legacy",
        key_spec(json!({"deletionPolicy": "Orphan", "secretName": "legacy-key"})),
    )
    .await;
    let id = key_id(&env.wait_apikey("legacy", "True", "Provisioned").await);
    let key = env.secret_key("legacy-key").await.expect("key");

    env.apikeys()
        .delete("legacy", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("ApiKey gone", Duration::from_secs(30), || async {
        env.apikeys()
            .get_opt("legacy")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(
        env.key_row_status(&id).await,
        "active",
        "the record is kept"
    );
    assert_eq!(
        env.gateway_entry(&key).await.map(|e| e["status"].clone()),
        Some(json!("active")),
        "the key still works"
    );
    let secret = Api::<Secret>::namespaced(env.kube.clone(), &env.ns)
        .get("legacy-key")
        .await
        .expect("Secret kept");
    assert!(
        secret
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty(),
        "no owner left for a garbage collector to follow"
    );
    assert_eq!(
        env.key_events(&id).await,
        vec!["EventTypeGenerateKey"],
        "nothing announced"
    );
}

/// A new key's Secret is created without a read first; a Secret of that name that is
/// not this ApiKey's is found by the create, read, and left alone, with a Conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_name_taken_by_another_secret_is_a_conflict_and_left_alone() {
    let env = TestEnv::new("key-taken").await;
    let _op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    let secrets = Api::<Secret>::namespaced(env.kube.clone(), &env.ns);
    let foreign: Secret = serde_json::from_value(json!({
        "metadata": {"name": "taken"},
        "stringData": {"password": "not-an-api-key"},
    }))
    .expect("secret");
    secrets
        .create(&Default::default(), &foreign)
        .await
        .expect("create the foreign Secret");

    env.apply_apikey("taken", key_spec(json!({"secretName": "taken"})))
        .await;
    let k = env.wait_apikey("taken", "False", "Conflict").await;
    let message = ready_condition(&k).message;
    assert!(message.contains("Secret taken exists"), "{message}");
    let kept = secrets.get("taken").await.expect("Secret kept");
    assert_eq!(
        kept.data
            .and_then(|d| d.get("password").map(|b| b.0.clone())),
        Some(b"not-an-api-key".to_vec()),
        "the foreign Secret is not overwritten"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&env.db)
        .await
        .expect("count");
    assert_eq!(rows, 0, "no key recorded");
}

/// A status an earlier release wrote by update (a patch by the same field manager)
/// keeps that manager's ownership of its fields; the next status write moves them to
/// the apply's entry, so a field the status no longer has is removed, not left stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_field_an_earlier_release_wrote_by_update_is_removed_once_left_out() {
    use kube::api::{Patch, PatchParams};
    let env = TestEnv::new("key-upgrade").await;
    let _op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    let at = chrono::Utc::now() + chrono::Duration::days(30);
    let at = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    env.apply_apikey("ci", key_spec(json!({"expiresAt": at})))
        .await;
    let k = env.wait_apikey("ci", "True", "Provisioned").await;
    assert!(k.status.and_then(|s| s.expires_at).is_some());

    // What the earlier release did: a status field written by a patch, an update (which
    // owns only the fields whose value it changes).
    let earlier = PatchParams {
        field_manager: Some("m3o-operator".into()),
        ..Default::default()
    };
    let later = chrono::Utc::now() + chrono::Duration::days(31);
    let later = later.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let patch = json!({"status": {"expiresAt": later}});
    let written = env
        .apikeys()
        .patch_status("ci", &earlier, &Patch::Merge(&patch))
        .await
        .expect("status update");
    let updates = |k: &m3o_crds::ApiKey| {
        k.metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|f| {
                f.manager.as_deref() == Some("m3o-operator")
                    && f.operation.as_deref() == Some("Update")
                    && f.subresource.as_deref() == Some("status")
            })
            .count()
    };
    assert_eq!(updates(&written), 1, "the earlier release's entry");

    env.apply_apikey("ci", key_spec(json!({}))).await;
    let k = eventually(
        "status.expiresAt removed",
        Duration::from_secs(30),
        || async {
            let k = env.apikeys().get("ci").await.ok()?;
            let status = k.status.as_ref()?;
            let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
            (ready.observed_generation == k.metadata.generation && status.expires_at.is_none())
                .then_some(k)
        },
    )
    .await;
    assert_eq!(updates(&k), 0, "upgraded to the apply's entry");
}

//! etcd convergence at a cost independent of history and fleet: a customer's change is
//! one etcd write, a retired key is not read again once its entry is gone, and a key's
//! expiry converges its own customer only.

use std::time::Duration;

use m3o_controllers::apikey::secret::hash;
use serde_json::json;

use crate::apikey::key_spec;
use crate::production::metric;
use crate::support::{Backends, TestEnv, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_reaches_every_entry_of_the_customer_in_one_etcd_write() {
    let env = TestEnv::new("conv-one-txn").await;
    let _op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    let mut hashes = Vec::new();
    for name in ["k1", "k2", "k3"] {
        env.apply_apikey(name, key_spec(json!({}))).await;
        env.wait_apikey(name, "True", "Provisioned").await;
        let key = env
            .secret_key(&format!("{name}-api-key"))
            .await
            .expect("key");
        hashes.push(hash(key.as_bytes()));
    }
    let id = env.row("alice").await.expect("customer row").id;

    env.customer_ready("alice", "Banned").await;
    let entries: Vec<String> = std::iter::once(format!("customers/{id}"))
        .chain(hashes.iter().map(|h| format!("apikeys/{h}")))
        .collect();
    eventually(
        "the customer banned and its three keys blocked in etcd",
        Duration::from_secs(20),
        || async {
            let customer = env.etcd_json(&entries[0]).await?;
            if customer["status"] != json!("banned") {
                return None;
            }
            for key in &entries[1..] {
                if env.etcd_json(key).await?["status"] != json!("blocked") {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let mut revisions = Vec::new();
    for key in &entries {
        revisions.push(env.etcd_mod_revision(key).await);
    }
    assert!(
        revisions.iter().all(|r| *r == revisions[0]),
        "one etcd transaction wrote the customer and its keys: {entries:?} at {revisions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_key_is_not_read_again_once_its_entry_is_gone() {
    let env = TestEnv::new("conv-retired").await;
    let _op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey("ci", key_spec(json!({"rotationGracePeriod": "1s"})))
        .await;
    env.wait_apikey("ci", "True", "Provisioned").await;
    let old = hash(env.secret_key("ci-api-key").await.expect("key").as_bytes());
    env.apply_apikey(
        "ci",
        key_spec(json!({"rotationGracePeriod": "1s", "rotationGeneration": 1})),
    )
    .await;
    let new = eventually("the rotated key", Duration::from_secs(20), || async {
        let key = env.secret_key("ci-api-key").await?;
        Some(hash(key.as_bytes())).filter(|h| *h != old)
    })
    .await;
    let gone = |h: String| {
        let db = env.db.clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT config_gone FROM api_keys WHERE key_hash = $1")
                .bind(h)
                .fetch_one(&db)
                .await
                .expect("key row")
        }
    };
    eventually(
        "the old key's entry gone and its row marked so",
        Duration::from_secs(30),
        || async {
            let absent = env.etcd_json(&format!("apikeys/{old}")).await.is_none();
            (absent && gone(old.clone()).await).then_some(())
        },
    )
    .await;
    assert!(!gone(new.clone()).await, "the live key is still converged");
    assert!(env.etcd_json(&format!("apikeys/{new}")).await.is_some());

    // Convergence no longer looks at the old key; the drift watcher still owns the
    // prefix: an entry written back by hand for it is removed.
    env.etcd
        .kv_client()
        .put(
            format!("{}/apikeys/{old}", env.etcd_prefix),
            r#"{"status":"active"}"#,
            None,
        )
        .await
        .expect("put");
    eventually(
        "the revived entry of a retired key pruned",
        Duration::from_secs(20),
        || async {
            env.etcd_json(&format!("apikeys/{old}"))
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_expiry_converges_its_own_customer_without_a_full_resync() {
    let env = TestEnv::new("conv-clock").await;
    // No periodic resync during the test: only the clock can act on the expiry.
    let op = env
        .start_operator_with(Backends {
            extra_args: vec!["--resync-interval".into(), "600s".into()],
            ..Backends::default()
        })
        .await;
    env.customer_ready("alice", "Active").await;
    env.apply_customer("bob", json!({"email": "bob@example.com"}))
        .await;
    env.wait_ready("bob").await;
    env.apply_apikey(
        "bobs",
        json!({"customerRef": {"name": "bob"}, "description": "no expiry", "scopes": ["*"]}),
    )
    .await;
    env.wait_apikey("bobs", "True", "Provisioned").await;
    let at = chrono::Utc::now() + chrono::Duration::seconds(6);
    let at = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    env.apply_apikey("soon", key_spec(json!({"expiresAt": at})))
        .await;
    env.wait_apikey("soon", "True", "Provisioned").await;
    let soon = env.secret_key("soon-api-key").await.expect("key");
    op.settle().await;
    let resyncs = metric(&op, "m3o_operator_config_resyncs_total").await;
    let clock = metric(&op, "m3o_operator_config_clock_converges_total").await;
    assert!(resyncs >= 1.0, "the start-up resync is counted");

    eventually("the entry expired", Duration::from_secs(30), || async {
        (env.gateway_entry(&soon).await?["status"] == json!("expired")).then_some(())
    })
    .await;
    eventually(
        "one clock convergence, for alice only",
        Duration::from_secs(10),
        || async {
            (metric(&op, "m3o_operator_config_clock_converges_total").await == clock + 1.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        metric(&op, "m3o_operator_config_resyncs_total").await,
        resyncs,
        "an expiry does not resync the whole prefix"
    );
}

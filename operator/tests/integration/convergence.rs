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
    let entries: Vec<String> = std::iter::once(m3o_platform_contract::customer_key(id))
        .chain(hashes.iter().map(|h| m3o_platform_contract::apikey_key(h)))
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
            let absent = env
                .etcd_json(&m3o_platform_contract::apikey_key(&old))
                .await
                .is_none();
            (absent && gone(old.clone()).await).then_some(())
        },
    )
    .await;
    assert!(!gone(new.clone()).await, "the live key is still converged");
    assert!(
        env.etcd_json(&m3o_platform_contract::apikey_key(&new))
            .await
            .is_some()
    );

    // Convergence no longer looks at the old key; the drift watcher still owns the
    // prefix: an entry written back by hand for it is removed.
    env.etcd
        .kv_client()
        .put(
            format!(
                "{}/{}",
                env.etcd_prefix,
                m3o_platform_contract::apikey_key(&old)
            ),
            r#"{"status":"active"}"#,
            None,
        )
        .await
        .expect("put");
    eventually(
        "the revived entry of a retired key pruned",
        Duration::from_secs(20),
        || async {
            env.etcd_json(&m3o_platform_contract::apikey_key(&old))
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
    // Read before any key has a deadline: nothing can cross one before this.
    let resyncs = metric(&op, "m3o_operator_config_resyncs_total").await;
    let clock = metric(&op, "m3o_operator_config_clock_converges_total").await;
    assert!(resyncs >= 1.0, "the start-up resync is counted");
    let at = chrono::Utc::now() + chrono::Duration::seconds(6);
    let at = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    env.apply_apikey("soon", key_spec(json!({"expiresAt": at})))
        .await;
    env.wait_apikey("soon", "True", "Provisioned").await;
    let soon = env.secret_key("soon-api-key").await.expect("key");

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_does_not_queue_behind_new_keys() {
    let env = TestEnv::new("conv-lanes").await;
    // One ApiKey reconcile at a time in the bulk lane, and that one never ends.
    let stuck = format!("ApiKey/{}/stuck", env.ns);
    let op = env
        .start_operator_with(Backends {
            extra_args: vec!["--concurrency".into(), "1".into()],
            extra_env: vec![("M3O_FAILPOINTS".into(), format!("reconcile-hang={stuck}"))],
            ..Backends::default()
        })
        .await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey("probe", key_spec(json!({}))).await;
    env.wait_apikey("probe", "True", "Provisioned").await;
    let probe = env.secret_key("probe-api-key").await.expect("key");

    env.apply_apikey("stuck", key_spec(json!({}))).await;
    eventually(
        "the new key's reconcile hanging in the bulk lane",
        Duration::from_secs(20),
        || async {
            let log = std::fs::read_to_string(&op.log_path).ok()?;
            log.lines()
                .any(|l| l.contains("the reconcile hangs") && l.contains(&stuck))
                .then_some(())
        },
    )
    .await;
    env.apply_apikey("probe", key_spec(json!({"blocked": true})))
        .await;
    eventually(
        "the block in etcd while the bulk lane is busy",
        Duration::from_secs(20),
        || async { (env.gateway_entry(&probe).await?["status"] == json!("blocked")).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resync_reconciles_only_objects_that_lost_their_record() {
    let env = TestEnv::new("conv-resync").await;
    let op = env
        .start_operator_with(Backends {
            extra_args: vec!["--resync-interval".into(), "2s".into()],
            ..Backends::default()
        })
        .await;
    env.customer_ready("alice", "Active").await;
    env.customer_ready("bob", "Active").await;
    let passes = "m3o_operator_object_resyncs_total{kind=\"Customer\"}";
    let due = "m3o_operator_resync_due_total{kind=\"Customer\"}";
    let after_passes = |n: f64| {
        let op = &op;
        async move {
            let from = metric(op, passes).await;
            eventually("resync passes", Duration::from_secs(20), || async {
                (metric(op, passes).await >= from + n).then_some(())
            })
            .await;
        }
    };
    // Once both are provisioned, a pass finds nothing due.
    after_passes(1.0).await;
    let steady = metric(&op, due).await;
    after_passes(2.0).await;
    assert_eq!(
        metric(&op, due).await,
        steady,
        "a steady fleet costs no reconcile"
    );

    // A record gone behind the operator's back (triggers off, as only a superuser can):
    // the next pass finds alice due, and her record is back.
    let mut tx = env.db.begin().await.expect("begin");
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .expect("triggers off");
    sqlx::query("DELETE FROM customers WHERE k8s_name = 'alice'")
        .execute(&mut *tx)
        .await
        .expect("delete the record");
    tx.commit().await.expect("commit");
    eventually("alice's record back", Duration::from_secs(30), || async {
        env.row("alice").await.map(|_| ())
    })
    .await;
    assert!(metric(&op, due).await > steady, "the resync found it due");
    assert!(env.row("bob").await.is_some());
}

//! Recovery (DESIGN section 4, recovery rule): writer terms that diverge between
//! Postgres and etcd heal in one step and without a restart.

use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::gateway::issue;
use crate::production::metric;
use crate::support::gateway::check;
use crate::support::{TestEnv, eventually, http_get};

/// `<prefix>.writer-epoch` of the test's (unsharded) operator.
fn epoch_key(env: &TestEnv) -> String {
    m3o_platform_contract::keys::writer_epoch_key(&env.etcd_prefix, "")
}

/// The writer term Postgres records.
async fn postgres_epoch(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT epoch FROM writer_fence WHERE name = ''")
        .fetch_one(&env.db)
        .await
        .expect("read writer_fence")
}

/// The writer term etcd records (`None`: no key).
async fn etcd_epoch(env: &TestEnv) -> Option<i64> {
    let resp = env
        .etcd
        .kv_client()
        .get(epoch_key(env), None)
        .await
        .expect("etcd get");
    let kv = resp.kvs().first()?;
    Some(
        kv.value_str()
            .expect("utf-8")
            .parse()
            .expect("an epoch number"),
    )
}

/// Keys under the prefix that the operator writes (gateway reports left out).
async fn operator_keys(env: &TestEnv) -> Vec<String> {
    let mut keys: Vec<String> = env
        .etcd_keys()
        .await
        .into_iter()
        .filter(|k| !k.contains("/gateways/"))
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_behind_etcd_starts_once_above_both() {
    let env = TestEnv::new("pg-behind").await;
    // As after a Postgres restore: etcd records a term Postgres never began.
    env.etcd
        .kv_client()
        .put(epoch_key(&env), format!("{:020}", 40), None)
        .await
        .expect("put writer-epoch");
    let mut op = env.start_operator().await;
    assert_eq!(postgres_epoch(&env).await, 41, "one step above etcd's 40");
    assert_eq!(etcd_epoch(&env).await, Some(41));

    env.apply_customer("after-restore", json!({"email": "r@example.com"}))
        .await;
    let ready = env.wait_ready("after-restore").await;
    let id = ready.status.and_then(|s| s.customer_id).expect("id");
    assert!(
        env.etcd_json(&m3o_platform_contract::customer_key(&id))
            .await
            .is_some(),
        "provisioned into etcd"
    );
    assert!(op.is_running(), "started once: no exit, no crash loop");
    assert_eq!(metric(&op, "m3o_operator_fence_divergence_total").await, 1.0);
    let log = std::fs::read_to_string(&op.log_path).expect("log");
    assert!(
        log.contains("\"level\":\"WARN\"") && log.contains("writer term diverged"),
        "a Warning says so:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_etcd_fence_key_heals_without_a_restart() {
    let env = TestEnv::new("fence-heal").await;
    let mut op = env.start_operator().await;
    let quota = json!({"requestsPerSecond": 100});
    let (key, _) = issue(&env, "dora", "dora-key", &["*"], quota.clone()).await;
    let (other, _) = issue(&env, "eve", "eve-key", &["*"], quota).await;
    let gateway = env.start_gateway(&env.gateway_config()).await;
    assert_eq!(check(&gateway, &key, "/v1/x/y").await.status, 200);
    op.settle().await;

    // etcd's fence key gone (etcd restored from an old snapshot, or deleted by hand):
    // every operator write is refused by etcd until the term is re-established.
    env.etcd
        .kv_client()
        .delete(epoch_key(&env), None)
        .await
        .expect("delete writer-epoch");
    env.apikeys()
        .patch(
            "dora-key",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"blocked": true}})),
        )
        .await
        .expect("block the key");
    let blocked_at = Instant::now();
    eventually(
        "the blocked key to be refused by the gateway",
        Duration::from_secs(5),
        || async { (check(&gateway, &key, "/v1/x/y").await.status == 401).then_some(()) },
    )
    .await;
    eprintln!(
        "writer-epoch deleted, key blocked -> 401 at the gateway after {:?}",
        blocked_at.elapsed()
    );
    assert!(op.is_running(), "healed without a restart");
    assert_eq!(etcd_epoch(&env).await, Some(postgres_epoch(&env).await));
    // At least one (tasks refused at once may each count the divergence they found).
    let found = metric(&op, "m3o_operator_fence_divergence_total").await;
    assert!(found >= 1.0, "counted: {found}");
    let addr = format!("127.0.0.1:{}", op.port);
    eventually("/readyz once healed", Duration::from_secs(30), || async {
        http_get(&addr, "/readyz")
            .await
            .filter(|(code, _)| *code == 200)
    })
    .await;

    // The whole prefix wiped, the fence key with it: everything comes back.
    let before = operator_keys(&env).await;
    env.etcd
        .kv_client()
        .delete(
            env.etcd_prefix.clone(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .expect("wipe the prefix");
    let wiped_at = Instant::now();
    eventually(
        "every key of the prefix restored",
        Duration::from_secs(30),
        || async { (operator_keys(&env).await == before).then_some(()) },
    )
    .await;
    eventually(
        "the live key to authenticate again",
        Duration::from_secs(10),
        || async { (check(&gateway, &other, "/v1/x/y").await.status == 200).then_some(()) },
    )
    .await;
    eprintln!(
        "prefix wiped -> {} keys restored and the live key 200 after {:?}",
        before.len(),
        wiped_at.elapsed()
    );
    assert_eq!(check(&gateway, &key, "/v1/x/y").await.status, 401);
    assert!(op.is_running(), "healed without a restart");
    assert!(metric(&op, "m3o_operator_fence_divergence_total").await > found);
    eventually("/readyz once healed", Duration::from_secs(30), || async {
        http_get(&addr, "/readyz")
            .await
            .filter(|(code, _)| *code == 200)
    })
    .await;
}

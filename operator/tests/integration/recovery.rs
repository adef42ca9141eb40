//! Recovery (DESIGN section 4, recovery rule): writer terms that diverge between
//! Postgres and etcd heal in one step and without a restart; a convergence whose
//! recording rolled back after its etcd write still keeps `GatewaySynced` honest; and
//! after a disaster (Postgres restored from an older backup, the etcd prefix wiped, the
//! stream flushed, all at once) the resources win while the ids are kept.

use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::gateway::{issue, wait_gateway_synced};
use crate::production::metric;
use crate::support::gateway::check;
use crate::support::proxy::{CuttableProxy, host_port, via};
use crate::support::{Backends, TestEnv, eventually, exit_log, http_get};

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

/// The fence key's value as stored, whatever it holds.
async fn epoch_bytes(env: &TestEnv) -> Option<Vec<u8>> {
    let value = env
        .etcd
        .kv_client()
        .get(epoch_key(env), None)
        .await
        .expect("etcd get");
    value.kvs().first().map(|kv| kv.value().to_vec())
}

/// The writer term etcd records (`None`: no key).
async fn etcd_epoch(env: &TestEnv) -> Option<i64> {
    let value = epoch_bytes(env).await?;
    Some(
        std::str::from_utf8(&value)
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
    assert_eq!(
        metric(&op, "m3o_operator_fence_divergence_total").await,
        1.0
    );
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
    // Once: of the tasks refused at once, only the one whose record of the term lands
    // counts it.
    let found = metric(&op, "m3o_operator_fence_divergence_total").await;
    assert_eq!(found, 1.0, "counted once");
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
    assert_eq!(
        metric(&op, "m3o_operator_fence_divergence_total").await,
        found + 1.0,
        "the wipe counted once"
    );
    eventually("/readyz once healed", Duration::from_secs(30), || async {
        http_get(&addr, "/readyz")
            .await
            .filter(|(code, _)| *code == 200)
    })
    .await;
}

/// The key's row: its hash and the etcd revision recorded for its entry.
async fn key_row(env: &TestEnv, id: &str) -> (String, i64) {
    sqlx::query_as(
        "SELECT key_hash, coalesce(config_revision, 0) FROM api_keys WHERE id = $1::uuid",
    )
    .bind(id)
    .fetch_one(&env.db)
    .await
    .expect("read the key's row")
}

/// A replica's report, as a gateway writes it: it has applied etcd up to `revision`,
/// and stops serving when etcd has not confirmed its index for 10 s (the default
/// `--max-staleness`; a report without a bound voids GatewaySynced).
async fn report_applied(env: &TestEnv, revision: i64) {
    env.etcd
        .kv_client()
        .put(
            format!("{}/gateways/stand-in", env.etcd_prefix),
            json!({"appliedRevision": revision, "maxStalenessSeconds": 10}).to_string(),
            None,
        )
        .await
        .expect("put the replica report");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_convergence_is_still_awaited_by_gateway_synced() {
    let env = TestEnv::new("rolled-back").await;
    let first = env.start_operator().await;
    let quota = json!({"requestsPerSecond": 100});
    let (_, issued) = issue(&env, "fay", "fay-key", &["*"], quota).await;
    let id = issued.status.and_then(|s| s.key_id).expect("keyId");
    // A replica (a stand-in report) that has applied everything up to now.
    let now = env
        .etcd
        .kv_client()
        .get(epoch_key(&env), None)
        .await
        .expect("etcd get")
        .header()
        .map(|h| h.revision())
        .expect("revision");
    report_applied(&env, now).await;
    wait_gateway_synced(&env, "fay-key", |_, s, _| s == "True").await;
    first.stop().await;

    // A writer that aborts right after its etcd write: the blocked entry lands in etcd,
    // the transaction recording its revision rolls back.
    let aborting = env.spawn_operator_with(Backends {
        extra_env: vec![("M3O_FAILPOINTS".into(), "abort-after-etcd-write".into())],
        ..Backends::default()
    });
    env.apikeys()
        .patch(
            "fay-key",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"blocked": true}})),
        )
        .await
        .expect("block the key");
    let (status, log) = exit_log(aborting, "the writer aborts after its etcd write").await;
    assert!(
        !status.success() && log.contains("abort-after-etcd-write"),
        "{log}"
    );
    let (hash, recorded) = key_row(&env, &id).await;
    let entry = m3o_platform_contract::apikey_key(&hash);
    assert_eq!(
        env.etcd_json(&entry).await.expect("entry")["status"],
        "blocked"
    );
    let entry_revision = env.etcd_mod_revision(&entry).await;
    assert!(
        recorded < entry_revision && now < entry_revision,
        "set-up: the write landed at {entry_revision}, the record ({recorded}) rolled back"
    );

    // The next writer finds nothing to write; the revision of the entry it now has is
    // still what every replica must have applied.
    let _second = env.start_operator().await;
    let (status, reason, message) = wait_gateway_synced(&env, "fay-key", |_, _, _| true).await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "Propagating"),
        "a replica at {now} < {entry_revision} still accepts the key: {message}"
    );
    assert!(message.contains(&entry_revision.to_string()), "{message}");
    assert_eq!(
        key_row(&env, &id).await.1,
        entry_revision,
        "the floor recorded"
    );

    report_applied(&env, entry_revision).await;
    let (_, _, message) = wait_gateway_synced(&env, "fay-key", |_, s, _| s == "True").await;
    assert!(message.contains(&entry_revision.to_string()), "{message}");
}

/// Runs `program args`, asserting success.
async fn must(program: &str, args: &[&str]) -> String {
    crate::support::cli::ok(program, args, None).await
}

/// A key of `customer` (already Ready) named `name`, Ready; its plaintext.
async fn key_for(env: &TestEnv, customer: &str, name: &str, extra: serde_json::Value) -> String {
    let mut spec = crate::apikey::key_spec(extra);
    spec["customerRef"]["name"] = json!(customer);
    env.apply_apikey(name, spec).await;
    env.wait_apikey(name, "True", "Provisioned").await;
    env.secret_key(&format!("{name}-api-key"))
        .await
        .expect("the key's Secret")
}

async fn customer_id(env: &TestEnv, name: &str) -> String {
    let c = env.customers().get(name).await.expect("customer");
    c.status.and_then(|s| s.customer_id).expect("customerId")
}

async fn wait_deleted<K>(api: &kube::Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(
        &format!("{name} to be deleted"),
        Duration::from_secs(60),
        || async { api.get_opt(name).await.ok()?.is_none().then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restore_a_wipe_and_a_flush_the_resources_win() {
    let env = TestEnv::new("restore").await;
    let started = chrono::Utc::now() - chrono::Duration::seconds(5);
    let op = env.start_operator().await;
    let quota = json!({"requestsPerSecond": 100});
    let (live, _) = issue(&env, "alpha", "a-live", &["*"], quota.clone()).await;
    let rotated_out = key_for(&env, "alpha", "a-rot", json!({"rotationGracePeriod": "0s"})).await;
    let blocked = key_for(&env, "alpha", "a-block", json!({})).await;
    let deleted = key_for(&env, "alpha", "a-del", json!({})).await;
    let (banned, _) = issue(&env, "beta", "b-key", &["*"], quota.clone()).await;
    let (gone_key, _) = issue(&env, "gone", "g-key", &["*"], quota).await;
    let (alpha_id, gone_id) = (
        customer_id(&env, "alpha").await,
        customer_id(&env, "gone").await,
    );
    op.settle().await;

    // The backup: this test's schema, as an admin would take it.
    let dump =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}.dump", env.schema));
    let dump = dump.to_str().expect("utf-8 path");
    must(
        "pg_dump",
        &[
            "--format=custom",
            "--schema",
            &env.schema,
            "--file",
            dump,
            &env.database_url,
        ],
    )
    .await;

    // After the backup: a rotation without grace, a block, a key and a customer deleted.
    env.apikeys()
        .patch(
            "a-rot",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rotationGeneration": 1}})),
        )
        .await
        .expect("rotate");
    env.apikeys()
        .patch(
            "a-block",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"blocked": true}})),
        )
        .await
        .expect("block");
    let rotated = eventually(
        "the rotated key in its Secret",
        Duration::from_secs(60),
        || async {
            env.secret_key("a-rot-api-key")
                .await
                .filter(|k| *k != rotated_out)
        },
    )
    .await;
    env.wait_apikey("a-rot", "True", "Provisioned").await;
    env.wait_apikey("a-block", "True", "Blocked").await;
    env.customers()
        .patch(
            "beta",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"state": "Banned"}})),
        )
        .await
        .expect("ban beta");
    env.wait_apikey("b-key", "True", "Blocked").await;
    let delete = kube::api::DeleteParams::default();
    env.apikeys()
        .delete("a-del", &delete)
        .await
        .expect("delete a-del");
    env.apikeys()
        .delete("g-key", &delete)
        .await
        .expect("delete g-key");
    env.subscriptions()
        .delete("gone", &delete)
        .await
        .expect("delete sub");
    env.customers()
        .delete("gone", &delete)
        .await
        .expect("delete gone");
    for name in ["a-del", "g-key"] {
        wait_deleted(&env.apikeys(), name).await;
    }
    wait_deleted(&env.customers(), "gone").await;
    op.settle().await;
    assert_eq!(op.stop().await.code(), Some(0));

    // The disaster, all at once: Postgres restored from the backup, the etcd prefix
    // wiped (the fence key with it), the stream flushed.
    sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", env.schema))
        .execute(&env.db)
        .await
        .expect("drop the schema");
    must("pg_restore", &["--dbname", &env.database_url, dump]).await;
    env.etcd
        .kv_client()
        .delete(
            env.etcd_prefix.clone(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .expect("wipe the prefix");
    let mut redis = redis::Client::open(env.redis_url.as_str())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let stream = m3o_events::stream_key(&env.stream_prefix, m3o_events::customers::TOPIC);
    redis::cmd("DEL")
        .arg(&stream)
        .query_async::<()>(&mut redis)
        .await
        .expect("flush the stream");

    let restarted_at = Instant::now();
    let op = env.start_operator().await;
    let gateway = env.start_gateway(&env.gateway_config()).await;
    let expected = [
        (&live, 200, "a-live"),
        (&rotated, 200, "a-rot (its Secret's key)"),
        (&rotated_out, 401, "a-rot's key rotated out without grace"),
        (&blocked, 401, "a-block, blocked after the backup"),
        (&banned, 403, "b-key, its customer banned after the backup"),
        (&deleted, 401, "a-del, deleted after the backup"),
        (
            &gone_key,
            401,
            "the key of the customer deleted after the backup",
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut wrong = Vec::new();
        for (key, status, what) in &expected {
            let got = check(&gateway, key, "/v1/x/y").await.status;
            if got != *status {
                wrong.push(format!("{what}: {got}, not {status}"));
            }
        }
        if wrong.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "after 60s: {}", wrong.join("; "));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "restore + wipe + flush -> every key right after {:?}",
        restarted_at.elapsed()
    );
    op.settle().await;
    for (key, status, what) in &expected {
        assert_eq!(
            check(&gateway, key, "/v1/x/y").await.status,
            *status,
            "{what}"
        );
    }
    assert_eq!(customer_id(&env, "alpha").await, alpha_id, "the id is kept");
    for (key, what) in [(&rotated_out, "rotated out"), (&deleted, "deleted")] {
        let hash = hex::encode(m3o_gateway::decision::key_hash(key));
        let status: String = sqlx::query_scalar("SELECT status FROM api_keys WHERE key_hash = $1")
            .bind(&hash)
            .fetch_one(&env.db)
            .await
            .expect("the key's row");
        assert_eq!(
            status, "revoked",
            "the key {what} after the backup is revoked"
        );
    }
    assert_eq!(env.row_by_id(&alpha_id).await.status, "active");
    let gone: (Option<chrono::DateTime<chrono::Utc>>,) =
        sqlx::query_as("SELECT deleted_at FROM customers WHERE id = $1::uuid")
            .bind(&gone_id)
            .fetch_one(&env.db)
            .await
            .expect("the deleted customer's row");
    assert!(
        gone.0.is_some(),
        "the customer deleted after the backup is retired"
    );
    assert!(
        env.etcd_json(&m3o_platform_contract::customer_key(&gone_id))
            .await
            .is_none(),
        "and absent from etcd"
    );

    let audit = env
        .admin(
            &["audit", "--namespace", &env.ns],
            &crate::admin::AdminBackends::default(),
        )
        .await;
    assert_eq!(
        audit.status.code(),
        Some(0),
        "{}",
        crate::support::cli::text(&audit)
    );

    // Consumers whose stream was lost: the retained events again, with their ids.
    let retained: Vec<(uuid::Uuid,)> =
        sqlx::query_as("SELECT id FROM outbox WHERE published_at IS NOT NULL AND created_at >= $1")
            .bind(started)
            .fetch_all(&env.db)
            .await
            .expect("retained events");
    assert!(!retained.is_empty());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_m3o-operator"))
        .args(["outbox", "replay", "--since", &started.to_rfc3339()])
        .args([
            "--database-schema",
            &env.schema,
            "--stream-prefix",
            &env.stream_prefix,
        ])
        .env("DATABASE_URL", &env.database_url)
        .env("REDIS_URL", &env.redis_url)
        .output()
        .await
        .expect("run outbox replay");
    assert!(out.status.success(), "{}", crate::support::cli::text(&out));
    let ids: std::collections::HashSet<String> = env
        .stream_events()
        .await
        .into_iter()
        .map(|e| e.id.to_string())
        .collect();
    for (id,) in &retained {
        assert!(
            ids.contains(&id.to_string()),
            "event {id} re-sent with its id"
        );
    }
    eprintln!(
        "outbox replay re-sent {} retained events with their ids",
        retained.len()
    );
}

/// The heartbeat's session (of this schema's holder; other than `besides`): its last
/// statement is the beat.
async fn heartbeat_session(env: &TestEnv, besides: Option<i32>) -> Option<i32> {
    sqlx::query_scalar::<_, i32>(
        "SELECT pid FROM pg_stat_activity \
         WHERE query LIKE 'UPDATE writer_fence SET beat_at%' AND pid <> coalesce($1, -1) \
           AND application_name = (SELECT holder_app FROM writer_fence WHERE name = '')",
    )
    .bind(besides)
    .fetch_optional(&env.db)
    .await
    .ok()
    .flatten()
}

/// Waits for a beat past the renew deadline (3 s) after `since` (which a lost term
/// would not see); returns its time.
async fn beat_past_the_deadline(
    env: &TestEnv,
    since: chrono::DateTime<chrono::Utc>,
    what: &str,
) -> chrono::DateTime<chrono::Utc> {
    eventually(
        &format!("a beat later than the renew deadline after {what}"),
        Duration::from_secs(15),
        || async {
            let beat_at: chrono::DateTime<chrono::Utc> =
                sqlx::query_scalar("SELECT beat_at FROM writer_fence WHERE name = ''")
                    .fetch_one(&env.db)
                    .await
                    .ok()?;
            (beat_at > since + chrono::Duration::seconds(4)).then_some(beat_at)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_session_that_is_cut_is_reopened_inside_the_lease() {
    let env = TestEnv::new("beat-reopen").await;
    let mut op = env
        .start_operator_with(Backends {
            extra_args: crate::production::FAST_TIMINGS.map(String::from).to_vec(),
            ..Backends::default()
        })
        .await;
    let session = || heartbeat_session(&env, None);
    let pid = eventually("the heartbeat session", Duration::from_secs(10), session).await;
    // As a proxy's idle timeout would: the session is gone under the holder.
    let cut_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT clock_timestamp() FROM pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&env.db)
            .await
            .expect("terminate the heartbeat session");
    let renewed = beat_past_the_deadline(&env, cut_at, "the cut").await;
    eprintln!(
        "heartbeat session terminated -> still beating {:?} later",
        (renewed - cut_at).to_std().unwrap_or_default()
    );
    assert!(op.is_running(), "the term was kept");
    assert_ne!(session().await, Some(pid), "on a new session");
    assert_eq!(metric(&op, "m3o_operator_leader").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_session_that_stops_answering_is_reopened_inside_the_lease() {
    let env = TestEnv::new("beat-frozen").await;
    let db_proxy = CuttableProxy::start(host_port(&env.database_url)).await;
    let mut op = env
        .start_operator_with(Backends {
            database_url: Some(via(&env.database_url, &db_proxy)),
            extra_args: crate::production::FAST_TIMINGS.map(String::from).to_vec(),
            ..Backends::default()
        })
        .await;
    let session = || heartbeat_session(&env, None);
    let pid = eventually("the heartbeat session", Duration::from_secs(10), session).await;
    // Every open session of the operator stops answering, none is closed (no error
    // comes back: a half-open path); new sessions get through.
    let frozen_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&env.db)
        .await
        .expect("clock");
    db_proxy.freeze();
    let renewed = beat_past_the_deadline(&env, frozen_at, "the freeze").await;
    eprintln!(
        "heartbeat session frozen -> still beating {:?} later",
        (renewed - frozen_at).to_std().unwrap_or_default()
    );
    assert!(op.is_running(), "the term was kept");
    // (The frozen session is still there at the server, its beat the last it ran.)
    let fresh = heartbeat_session(&env, Some(pid)).await;
    assert!(fresh.is_some(), "beating on a new session");
    let log = std::fs::read_to_string(&op.log_path).expect("log");
    assert!(
        log.contains("writer fence heartbeat timed out; reopening its session"),
        "{log}"
    );
    db_proxy.cut();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_kept_by_orphan_survive_and_records_of_vanished_resources_are_retired() {
    let env = TestEnv::new("orphan-pass").await;
    let op = env.start_operator().await;
    let orphan = json!({"deletionPolicy": "Orphan"});
    env.apply_customer(
        "kept",
        json!({"email": "kept@example.com", "deletionPolicy": "Orphan"}),
    )
    .await;
    env.apply_customer("vanished", json!({"email": "v@example.com"}))
        .await;
    let kept_key = key_for(&env, "kept", "kept-key", orphan).await;
    let kept_id = customer_id(&env, "kept").await;
    let vanished_id = customer_id(&env, "vanished").await;
    let delete = kube::api::DeleteParams::default();
    env.apikeys()
        .delete("kept-key", &delete)
        .await
        .expect("delete kept-key");
    env.customers()
        .delete("kept", &delete)
        .await
        .expect("delete kept");
    wait_deleted(&env.apikeys(), "kept-key").await;
    wait_deleted(&env.customers(), "kept").await;
    op.settle().await;
    assert_eq!(op.stop().await.code(), Some(0));
    // Gone without its cleanup (its finalizer removed by hand while no operator ran).
    env.customers()
        .delete("vanished", &delete)
        .await
        .expect("delete vanished");
    env.customers()
        .patch(
            "vanished",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("remove the finalizer");
    wait_deleted(&env.customers(), "vanished").await;

    let op = env.start_operator().await;
    op.wait_log(
        "the pass over the live records",
        "compared the live records with the resources",
    )
    .await;
    op.settle().await;
    let deleted_at = |id: String| {
        let db = env.db.clone();
        async move {
            sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
                "SELECT deleted_at FROM customers WHERE id = $1::uuid",
            )
            .bind(id)
            .fetch_one(&db)
            .await
            .expect("customer row")
        }
    };
    assert!(
        deleted_at(kept_id.clone()).await.is_none(),
        "Orphan kept it"
    );
    assert!(
        env.etcd_json(&m3o_platform_contract::customer_key(&kept_id))
            .await
            .is_some()
    );
    let gateway = env.start_gateway(&env.gateway_config()).await;
    assert_eq!(
        check(&gateway, &kept_key, "/v1/x/y").await.status,
        200,
        "the orphaned key keeps working"
    );
    assert!(
        deleted_at(vanished_id.clone()).await.is_some(),
        "the vanished one is retired"
    );
    assert!(
        env.etcd_json(&m3o_platform_contract::customer_key(&vanished_id))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_term_in_etcd_stops_the_writer_and_its_restart_begins_above_both() {
    let env = TestEnv::new("etcd-ahead").await;
    let op = env.start_operator().await;
    env.apply_customer("cleo", json!({"email": "cleo@example.com"}))
        .await;
    let id = env
        .wait_ready("cleo")
        .await
        .status
        .and_then(|s| s.customer_id)
        .expect("id");
    let mine = postgres_epoch(&env).await;
    // Postgres restored under a running operator: etcd records a term Postgres does not.
    env.etcd
        .kv_client()
        .put(epoch_key(&env), format!("{:020}", mine + 10), None)
        .await
        .expect("put writer-epoch");
    env.apply_customer("cleo", json!({"email": "cleo@example.com", "name": "Cleo"}))
        .await;
    let (status, log) = exit_log(op, "the writer stops").await;
    assert!(!status.success());
    assert!(
        log.contains("etcd records a newer writer term than Postgres"),
        "{log}"
    );
    let key = m3o_platform_contract::customer_key(&id);
    assert_ne!(
        env.etcd_json(&key).await.map(|v| v["name"].clone()),
        Some(json!("Cleo")),
        "nothing written under the newer term"
    );

    let mut op = env.start_operator().await;
    assert_eq!(postgres_epoch(&env).await, mine + 11, "one step above both");
    eventually("the change in etcd", Duration::from_secs(30), || async {
        let name = env.etcd_json(&key).await?["name"].clone();
        (name == json!("Cleo")).then_some(())
    })
    .await;
    assert!(op.is_running());
}

/// Every key of the prefix and beside it (`<prefix>.writer-epoch*`), with its value and
/// revision: what "writes nothing to etcd" compares.
async fn prefix_snapshot(env: &TestEnv) -> Vec<(String, Vec<u8>, i64)> {
    let resp = env
        .etcd
        .kv_client()
        .get(
            env.etcd_prefix.clone(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("etcd list");
    resp.kvs()
        .iter()
        .map(|kv| {
            let key = kv.key_str().expect("utf-8 key").to_owned();
            (key, kv.value().to_vec(), kv.mod_revision())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_database_on_one_prefix_is_refused_and_writes_nothing() {
    let env = TestEnv::new("prefix-first").await;
    let mut first = env.start_operator().await;
    env.apply_customer("ann", json!({"email": "ann@example.com"}))
        .await;
    let id = env
        .wait_ready("ann")
        .await
        .status
        .and_then(|s| s.customer_id)
        .expect("id");
    let first_db: uuid::Uuid = sqlx::query_scalar("SELECT id FROM database_identity")
        .fetch_one(&env.db)
        .await
        .expect("database id");
    let database_key = m3o_platform_contract::keys::writer_database_key(&env.etcd_prefix);
    let recorded = env
        .etcd
        .kv_client()
        .get(database_key.clone(), None)
        .await
        .expect("etcd get");
    assert_eq!(
        recorded.kvs().first().map(|kv| kv.value().to_vec()),
        Some(first_db.to_string().into_bytes()),
        "the first operator's database is recorded beside the prefix"
    );
    first.settle().await;

    // A second database (its own schema: blue/green) misconfigured with the same
    // --etcd-prefix, with a resource it would write.
    let mut second = TestEnv::new("prefix-second").await;
    second.etcd_prefix = env.etcd_prefix.clone();
    second
        .apply_customer("bob", json!({"email": "bob@example.com"}))
        .await;
    let before = prefix_snapshot(&env).await;
    let op = second.spawn_operator_with(crate::support::Backends::default());
    let (status, log) = exit_log(op, "the second operator refuses the prefix").await;
    assert!(!status.success(), "{log}");
    let line = format!(
        "etcd prefix {} is written by another database (id {first_db};",
        env.etcd_prefix
    );
    assert_eq!(log.matches(&line).count(), 1, "one line says so:\n{log}");
    let said = log.lines().find(|l| l.contains(&line)).expect("the line");
    assert!(
        said.contains("each database needs its own --etcd-prefix"),
        "{said}"
    );
    assert_eq!(
        prefix_snapshot(&env).await,
        before,
        "nothing written to etcd"
    );
    let second_epoch: i64 = sqlx::query_scalar("SELECT epoch FROM writer_fence WHERE name = ''")
        .fetch_one(&second.db)
        .await
        .expect("second writer_fence");
    assert!(second_epoch > 0, "it did take its own database's fence");

    // The first keeps working.
    env.apply_customer("ann", json!({"email": "ann@example.com", "name": "Ann"}))
        .await;
    let key = m3o_platform_contract::customer_key(&id);
    eventually(
        "the first operator's change in etcd",
        Duration::from_secs(30),
        || async {
            let name = env.etcd_json(&key).await?["name"].clone();
            (name == json!("Ann")).then_some(())
        },
    )
    .await;
    assert!(first.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_key_holding_no_term_refuses_writes_says_so_once_and_heals_when_deleted() {
    let env = TestEnv::new("fence-junk").await;
    let mut op = env.start_operator().await;
    env.apply_customer("fay", json!({"email": "fay@example.com"}))
        .await;
    let id = env
        .wait_ready("fay")
        .await
        .status
        .and_then(|s| s.customer_id)
        .expect("id");
    let key = m3o_platform_contract::customer_key(&id);
    op.settle().await;

    // A hand edit of the fence key: not a term, so not overwritten.
    env.etcd
        .kv_client()
        .put(epoch_key(&env), "banana", None)
        .await
        .expect("put writer-epoch");
    for name in ["Fay", "Fay A.", "Fay B."] {
        env.apply_customer("fay", json!({"email": "fay@example.com", "name": name}))
            .await;
    }
    // (JSON logs escape the quotes around the value.)
    let line = format!("etcd key {} holds \\\"banana\\\"", epoch_key(&env));
    op.wait_log("the refusal said", &line).await;
    let addr = format!("127.0.0.1:{}", op.port);
    eventually("/readyz failing on it", Duration::from_secs(10), || async {
        http_get(&addr, "/readyz")
            .await
            .filter(|(code, body)| *code == 503 && body.contains("banana"))
    })
    .await;
    assert!(op.is_running(), "refuses, does not stop");
    assert_ne!(
        env.etcd_json(&key).await.map(|v| v["name"].clone()),
        Some(json!("Fay B.")),
        "nothing written while the key holds no term"
    );
    assert_eq!(
        epoch_bytes(&env).await,
        Some(b"banana".to_vec()),
        "left for a human"
    );

    // A human deletes it: the term is recorded again and the change lands.
    env.etcd
        .kv_client()
        .delete(epoch_key(&env), None)
        .await
        .expect("delete writer-epoch");
    eventually("the change in etcd", Duration::from_secs(60), || async {
        let name = env.etcd_json(&key).await?["name"].clone();
        (name == json!("Fay B.")).then_some(())
    })
    .await;
    assert_eq!(etcd_epoch(&env).await, Some(postgres_epoch(&env).await));
    let log = std::fs::read_to_string(&op.log_path).expect("log");
    let said: Vec<&str> = log.lines().filter(|l| l.contains(&line)).collect();
    assert_eq!(said.len(), 1, "said once:\n{}", said.join("\n"));
    assert!(said[0].contains("\"level\":\"WARN\""), "{}", said[0]);
    assert!(op.is_running());

    // At a start, such a key is a one-line error, and is left as it is.
    op.stop().await;
    env.etcd
        .kv_client()
        .put(epoch_key(&env), "banana", None)
        .await
        .expect("put writer-epoch");
    let op = env.spawn_operator_with(crate::support::Backends::default());
    let (status, log) = exit_log(op, "the start refuses").await;
    assert!(!status.success());
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("m3o-operator: error: etcd key ")
            && last.contains(&epoch_key(&env))
            && last.contains("not a writer term"),
        "{log}"
    );
    assert_eq!(epoch_bytes(&env).await, Some(b"banana".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_writer_that_finds_its_prefix_claimed_by_another_database_stops() {
    let env = TestEnv::new("prefix-claimed").await;
    let op = env.start_operator().await;
    env.apply_customer("gus", json!({"email": "gus@example.com"}))
        .await;
    let id = env
        .wait_ready("gus")
        .await
        .status
        .and_then(|s| s.customer_id)
        .expect("id");
    op.settle().await;
    // As after an etcd wipe that another database's operator was first to claim.
    let other = uuid::Uuid::new_v4();
    env.etcd
        .kv_client()
        .put(
            m3o_platform_contract::keys::writer_database_key(&env.etcd_prefix),
            other.to_string(),
            None,
        )
        .await
        .expect("put the database key");
    let before = prefix_snapshot(&env).await;
    for name in ["Gus", "Gus A.", "Gus B."] {
        env.apply_customer("gus", json!({"email": "gus@example.com", "name": name}))
            .await;
    }
    let (status, log) = exit_log(op, "the writer stops").await;
    assert!(!status.success());
    let line = format!(
        "etcd prefix {} is written by another database (id {other};",
        env.etcd_prefix
    );
    assert_eq!(log.matches(&line).count(), 1, "said once:\n{log}");
    assert!(
        log.lines()
            .last()
            .is_some_and(|l| l.starts_with("m3o-operator: error: ") && l.contains(&line)),
        "as its exit message:\n{log}"
    );
    assert_eq!(
        prefix_snapshot(&env).await,
        before,
        "nothing written to etcd"
    );
    assert_ne!(
        env.etcd_json(&m3o_platform_contract::customer_key(&id))
            .await
            .map(|v| v["name"].clone()),
        Some(json!("Gus B."))
    );

    // Its restart refuses too, with the same line, until a human decides.
    let op = env.spawn_operator_with(crate::support::Backends::default());
    let (status, log) = exit_log(op, "the restart refuses").await;
    assert!(!status.success());
    assert!(
        log.lines()
            .last()
            .is_some_and(|l| l.starts_with("m3o-operator: error: ") && l.contains(&line)),
        "{log}"
    );
    assert_eq!(
        prefix_snapshot(&env).await,
        before,
        "nothing written to etcd"
    );
}

/// A guard of the count: on a small machine the refused writes land a few ms apart and
/// the first heals the fence before the next is refused, so this passes even when every
/// re-establishing task counts (the compare-and-swap in `record_term` is what keeps
/// truly concurrent ones to one count; the refusals that stop or wait for a human are
/// kept out of the count by the unit test `a_refusal_is_said_once_and_not_counted`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_refused_at_once_count_one_divergence() {
    let env = TestEnv::new("fence-count").await;
    let op = env.start_operator().await;
    let names: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    for name in &names {
        env.apply_customer(name, json!({"email": format!("{name}@example.com")}))
            .await;
    }
    for name in &names {
        env.wait_ready(name).await;
    }
    op.settle().await;
    assert_eq!(
        metric(&op, "m3o_operator_fence_divergence_total").await,
        0.0
    );

    env.etcd
        .kv_client()
        .delete(epoch_key(&env), None)
        .await
        .expect("delete writer-epoch");
    // Every customer changed while the operator is stopped (well inside its lease): it
    // wakes up to all the changes at once, and their reconciles are refused by etcd
    // together.
    op.signal("STOP").await;
    for name in &names {
        env.apply_customer(
            name,
            json!({"email": format!("{name}@example.com"), "name": "renamed"}),
        )
        .await;
    }
    op.signal("CONT").await;
    for name in &names {
        let id = env
            .wait_ready(name)
            .await
            .status
            .and_then(|s| s.customer_id)
            .expect("id");
        let key = m3o_platform_contract::customer_key(&id);
        eventually("the change in etcd", Duration::from_secs(30), || async {
            (env.etcd_json(&key).await?["name"] == json!("renamed")).then_some(())
        })
        .await;
    }
    assert_eq!(
        metric(&op, "m3o_operator_fence_divergence_total").await,
        1.0,
        "one divergence, counted once"
    );
}

/// The mechanism behind counting a divergence once, on the real etcd and Postgres:
/// writes of one term refused together all find etcd behind and re-establish the term
/// at once; one record lands, and only it counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_writes_refused_together_one_records_the_term_and_counts_the_divergence() {
    use m3o_controllers::platform::{PlatformConfig, divergence::Divergence};
    use m3o_controllers::report::metrics::Metrics;
    use m3o_controllers::store::fence::{Term, database_id};

    let env = TestEnv::new("fence-cas").await;
    let epoch: i64 = sqlx::query_scalar(
        "UPDATE writer_fence SET epoch = epoch + 1 WHERE name = '' RETURNING epoch",
    )
    .fetch_one(&env.db)
    .await
    .expect("begin a term");
    let term = Term::of(String::new());
    term.begin(epoch);
    let metrics = Metrics::new();
    let endpoints: Vec<String> = env.etcd_endpoints.split(',').map(str::to_owned).collect();
    let id = database_id(&env.db).await.expect("database id");
    let platform = PlatformConfig::connect(
        &endpoints,
        &env.etcd_prefix,
        PlatformConfig::connect_timeouts(),
    )
    .await
    .expect("connect to etcd")
    .fenced_by(
        &term,
        env.db.clone(),
        Divergence::counting(metrics.fence_divergence.clone()),
    )
    .of_database(id);
    // What each refused write read: no term, no database (a wiped etcd).
    let seen = platform.fence_state().await.expect("fence state");
    let recorded = futures::future::join_all((0..8).map(|_| platform.reestablish(&seen))).await;
    let landed = recorded
        .into_iter()
        .map(|r| r.expect("reestablish"))
        .filter(|&landed| landed)
        .count();
    assert_eq!(landed, 1, "one record lands");
    assert_eq!(metrics.fence_divergence.get(), 1, "counted once");
    assert_eq!(etcd_epoch(&env).await, Some(epoch));
    assert!(platform.term_recorded().await.expect("fence state"));
}
